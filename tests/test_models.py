import pytest
import torch

from fedmd_ray.config import ConfigError
from fedmd_ray.models import build_model, parameter_count, parse_model_name
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
