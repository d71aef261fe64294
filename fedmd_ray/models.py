"""Models by name: the paper's small CNNs, and torchvision classifiers adapted to small images.

Names:
  cnn2[:n1,n2,dropout]        2-layer CNN of the FedMD paper (default 128,256,0.2)
  cnn3[:n1,n2,n3,dropout]     3-layer CNN of the FedMD paper (default 128,192,256,0.2)
  resnet18, mobilenet_v3_small, shufflenet_v2_x0_5, ...  torchvision, trained from scratch
  anything else               a user's model: a registered name, package.module:factory or
                              path/to/file.py:factory, with ?key=value options (plugins.py);
                              called as factory(num_classes=..., image_shape=(C, H, W), ...)

The paper's CNNs follow the authors' network definitions: each block is conv -> batch norm ->
ReLU -> dropout -> average pooling, and the head is a bias-free dense layer with L2 1e-3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmd_ray.errors import ConfigError, raised_at
from fedmd_ray.model_names import (  # noqa: F401  (models.X names kept for callers)
    KNOWN_MODELS,
    PAPER_MODELS,
    TORCHVISION_MODELS,
    check_model_name,
    is_builtin,
    parse_model_name,
)
from fedmd_ray.plugins import MODELS, Code, parse_spec
from fedmd_ray.usercode import check_call

# Keras' L2(1e-3) adds 1e-3 * sum(w^2) to the loss, i.e. 2e-3 * w to the gradient.
HEAD_WEIGHT_DECAY = 2e-3


# BatchNorm as the authors' Keras layers have it (momentum 0.99 of the old average, eps 1e-3)
# or as torch has it. Keras' running averages move 10x slower: fed batches of 5 private
# images in the revisit, torch's forget the public statistics within a few steps.
BATCHNORM = {"keras": {"momentum": 0.01, "eps": 1e-3}, "torch": {"momentum": 0.1, "eps": 1e-5}}


def _block(
    c_in: int, c_out: int, kernel: int, stride: int, same: bool, dropout: float, batchnorm: str
) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2 if same else 0),
        nn.BatchNorm2d(c_out, **BATCHNORM[batchnorm]),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    ]


class _Shifted(torch.autograd.Function):
    """2x2 average pooling with stride 1 as shifted slices, backward written out: autograd's
    own backward of four slices zero-fills and copies four full-size tensors; this one pads
    once and adds in place (a grouped digest of tiny CNNs measured 8 % faster). Each input's
    gradient gathers its windows' terms in avg_pool2d's order (the windows in raster order,
    each term g / 4, exact as g * 0.25), so it is bit for bit avg_pool2d's, as is the
    forward: ((a + b) + c) + d, then / 4."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = x[..., :-1, :-1] + x[..., :-1, 1:]
        out += x[..., 1:, :-1]
        out += x[..., 1:, 1:]
        return out.mul_(0.25)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        quarter = grad * 0.25
        # Input (i, j) is the bottom-right of window (i-1, j-1), the bottom-left of (i-1, j),
        # the top-right of (i, j-1) and the top-left of (i, j): in that order.
        out = nn.functional.pad(quarter, (1, 0, 1, 0))
        out[..., 1:, :-1] += quarter
        out[..., :-1, 1:] += quarter
        out[..., :-1, :-1] += quarter
        return out


def shifted_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """avg_pool2d(x, 2, stride=1), the same numbers forward and backward, faster on a CPU."""
    return _Shifted.apply(x)


class ShiftedAvgPool(nn.Module):
    """AvgPool2d(2, stride=1) that, on a CPU, pools with shifted slices instead of calling
    avg_pool2d: the same float32 sums in the kernel's order and the same gradients (bit for
    bit, forward and backward: tests/test_models.py), and several times faster on this
    project's small activations, where torch's CPU kernel spends ~14 ns an output on index
    arithmetic (it was half of a tiny CNN's evaluation). On a GPU, one kernel beats four."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return nn.functional.avg_pool2d(x, 2, stride=1)
        return shifted_avg_pool(x)


def _same_avgpool() -> nn.Module:
    # Keras' 2x2 average pool with stride 1 and 'same' padding keeps the size and pads
    # only the bottom/right edge, averaging real pixels there: replicate-pad then pool.
    return nn.Sequential(nn.ReplicationPad2d((0, 1, 0, 1)), ShiftedAvgPool())


class PaperCNN(nn.Module):
    """The FedMD paper's 2- or 3-layer CNN."""

    head_weight_decay = HEAD_WEIGHT_DECAY

    def __init__(
        self,
        filters: tuple[int, ...],
        dropout: float,
        in_shape: tuple[int, int, int],
        num_classes: int,
        batchnorm: str = "keras",
    ):
        super().__init__()
        c = in_shape[0]
        bn = batchnorm
        layers = [*_block(c, filters[0], 3, 1, True, dropout, bn), _same_avgpool()]
        if len(filters) == 2:
            layers += _block(filters[0], filters[1], 3, 2, False, dropout, bn)
        else:
            layers += _block(filters[0], filters[1], 2, 2, False, dropout, bn)
            layers.append(nn.AvgPool2d(2, stride=2))
            layers += _block(filters[1], filters[2], 3, 2, False, dropout, bn)
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            width = self.features.eval()(torch.zeros(1, *in_shape)).shape[1]
        self.head = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _adapt_torchvision(model: nn.Module, in_channels: int) -> nn.Module:
    """Small images: the first conv keeps resolution (3x3, stride 1) and takes `in_channels`;
    the stem's max pool goes, or 28x28 inputs would shrink to nothing."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        in_channels, child.out_channels, 3, stride=1, padding=1, bias=child.bias is not None
                    ),
                )
                break
        else:
            continue
        break
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def build_model(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    code: Code | None = None,
    factory: object = None,
    batchnorm: str = "keras",
) -> nn.Module:
    """A fresh model (weights from torch's current RNG) for inputs of `in_shape` ((C, H, W)
    for images). A user's model comes from its spec (inside an actor, from the shipped
    `code`), or from `factory` when the driver registered it. `batchnorm` ('keras' or
    'torch') sets the paper CNNs' BatchNorm; other models keep their own."""
    if not is_builtin(name):
        if factory is not None:
            make, kwargs = factory, parse_spec(name).kwargs
        else:
            make, kwargs = MODELS.resolve(name, code)
        check_call(
            make,
            "its factory",
            "A model factory takes num_classes and image_shape (C, H, W) by those names, and the "
            "options its spec gives (file.py:factory?width=32).",
            num_classes=num_classes,
            image_shape=tuple(in_shape),
            **kwargs,
        )
        return make(num_classes=num_classes, image_shape=tuple(in_shape), **kwargs)
    if len(in_shape) != 3:
        raise ConfigError(
            f"Model '{name}' takes images (C, H, W); this data's samples have shape {tuple(in_shape)}. "
            "Use a model of your own for non-image data (see `fedmd-ray models`)."
        )
    base, params = parse_model_name(name)
    if base in PAPER_MODELS:
        return PaperCNN(params[:-1], params[-1], in_shape, num_classes, batchnorm)
    import torchvision

    model = torchvision.models.get_model(base, weights=None, num_classes=num_classes)
    return _adapt_torchvision(model, in_shape[0])


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_model(
    name: str,
    sample: torch.Tensor,
    num_classes: int,
    who: str,
    factory: object = None,
    code: Code | None = None,
    batchnorm: str = "keras",
) -> nn.Module:
    """Build model `name` and run it on `sample` (a batch of two real inputs, prepared as
    training prepares them); refuse, in one line naming `who`, anything that is not an
    nn.Module mapping the batch to (2, num_classes) finite scores. Returns the model."""

    def fail(what: str) -> ConfigError:
        return ConfigError(f"Model '{name}' of {who}: {what}")

    try:
        model = build_model(name, tuple(sample.shape[1:]), num_classes, code, factory, batchnorm)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        raise fail(f"its factory raised {type(exc).__name__}: {exc}{raised_at(exc)}") from None
    if not isinstance(model, nn.Module):
        raise fail(f"its factory returned {type(model).__name__!r}, not a torch.nn.Module.")
    try:
        with torch.no_grad():
            out = model.eval()(sample)
    except Exception as exc:
        raise fail(
            f"it fails on a batch of inputs of shape {tuple(sample.shape)} ({sample.dtype}): "
            f"{type(exc).__name__}: {exc}{raised_at(exc)}"
        ) from None
    want = (sample.shape[0], num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise fail(f"it maps a batch of shape {tuple(sample.shape)} to {got}; it must give {want} scores.")
    # Each of these would otherwise surface later as a participant failing mid-run, or as
    # scores refused as "diverged" after a whole transfer learning on NaN losses.
    if not out.is_floating_point():
        raise fail(f"its scores are {out.dtype}; they must be floating point (logits).")
    if not bool(torch.isfinite(out).all()):
        raise fail(
            "it gives NaN or infinite scores on two public samples before any training; "
            "look for a log of 0, a division by 0 or an overflow in its forward."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise fail(
            "it has no parameters to train (none requires grad); FedMD trains every participant's model."
        )
    return model
