import pytest
import torch

from fedmd_ray.config import ConfigError
from fedmd_ray.models import ShiftedAvgPool, build_model, parameter_count, parse_model_name
from fedmd_ray.presets import PAPER_MODELS


def _paper_cnn2_params(n1, n2, classes, c=1, size=28):
    side = (size - 3) // 2 + 1
    return (c * n1 * 9 + n1) + 2 * n1 + (n1 * n2 * 9 + n2) + 2 * n2 + side * side * n2 * classes


def _paper_cnn3_params(n1, n2, n3, classes, c=1, size=28):
    side = ((size // 2) // 2 - 3) // 2 + 1
    return (
        (c * n1 * 9 + n1)
        + 2 * n1
        + (n1 * n2 * 4 + n2)
        + 2 * n2
        + (n2 * n3 * 9 + n3)
        + 2 * n3
        + side * side * n3 * classes
    )


def test_paper_cnns_match_the_authors_layer_shapes():
    model = build_model("cnn2:128,256,0.2", (1, 28, 28), 16)
    assert parameter_count(model) == _paper_cnn2_params(128, 256, 16) == 989_440
    model = build_model("cnn3:64,128,256,0.2", (1, 28, 28), 16)
    assert parameter_count(model) == _paper_cnn3_params(64, 128, 256, 16)
    assert model.head.bias is None
    kinds = [type(m).__name__ for m in model.features][:5]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout", "Sequential"]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_paper_model_runs_on_mnist_and_cifar_shapes(name):
    for shape in [(1, 28, 28), (3, 32, 32)]:
        out = build_model(name, shape, 16).eval()(torch.zeros(2, *shape))
        assert out.shape == (2, 16)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_torchvision_models_take_small_grey_images(name):
    model = build_model(name, (1, 28, 28), 16).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 16)


def test_model_names_are_checked():
    assert parse_model_name("cnn2") == ("cnn2", (128, 256, 0.2))
    assert parse_model_name("cnn3:8,16,32,0.5") == ("cnn3", (8, 16, 32, 0.5))
    with pytest.raises(ConfigError, match="Unknown model 'resnet19'. Did you mean 'resnet18'.*Known models"):
        parse_model_name("resnet19")
    with pytest.raises(ConfigError, match="takes 2 filter counts and a dropout"):
        parse_model_name("cnn2:8,16")
    with pytest.raises(ConfigError, match="dropout"):
        parse_model_name("cnn2:8,16,1.5")
    with pytest.raises(ConfigError, match="takes no parameters"):
        parse_model_name("resnet18:3")


@pytest.mark.parametrize("shape", [(7, 3, 17, 17), (2, 5, 9, 12), (50, 8, 15, 15), (1, 1, 2, 2)])
def test_shifted_pooling_is_avg_pool2d_bit_for_bit(shape):
    # The paper CNNs' 'same' pooling adds four slices on a CPU: every output and every
    # gradient must be avg_pool2d's exactly, or runs would differ from earlier versions' runs.
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    grad = torch.randn(*shape[:2], shape[2] - 1, shape[3] - 1, generator=gen)
    outs, grads = [], []
    for pool in (torch.nn.AvgPool2d(2, stride=1), ShiftedAvgPool()):
        x.grad = None
        out = pool(x)
        out.backward(grad)
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    # Control: the same sums in another order do differ somewhere in the last bits.
    other = (x[..., 1:, 1:] + x[..., 1:, :-1] + x[..., :-1, 1:] + x[..., :-1, :-1]) / 4
    assert shape == (1, 1, 2, 2) or not torch.equal(other.detach(), outs[0])


@pytest.mark.parametrize("name", ["cnn2:8,16,0.2", "cnn3:8,16,16,0.2"])
def test_a_paper_cnn_trains_as_with_torchs_pooling_kernel(name):
    model = build_model(name, (1, 28, 28), 10)
    reference = build_model(name, (1, 28, 28), 10)
    reference.load_state_dict(model.state_dict())
    for module in reference.modules():  # the kernel the shifted slices replace
        for key, child in module.named_children():
            if type(child) is ShiftedAvgPool:
                setattr(module, key, torch.nn.AvgPool2d(2, stride=1))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    results = []
    for net in (model, reference):
        torch.manual_seed(3)  # the same dropout masks
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in net.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
