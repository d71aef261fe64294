"""Model names: which are built in, how a paper CNN's filters and dropout are written, and
checking a name before any work. Without torch, so that a driver that only coordinates
actors never loads it (models.py builds the models)."""

from __future__ import annotations

from fedmd_ray.errors import ConfigError, did_you_mean
from fedmd_ray.plugins import MODELS, parse_spec

TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "regnet_y_400mf",
)
PAPER_MODELS = {"cnn2": (128, 256, 0.2), "cnn3": (128, 192, 256, 0.2)}
KNOWN_MODELS = (*PAPER_MODELS, *TORCHVISION_MODELS)
for _name in KNOWN_MODELS:
    MODELS.add_builtin(_name, _name)  # listed with users' models; built by models.build_model


def is_builtin(name: str) -> bool:
    return name.strip().partition(":")[0] in KNOWN_MODELS


def parse_model_name(name: str) -> tuple[str, tuple]:
    """Split 'cnn2:128,384,0.2' into ('cnn2', (128, 384, 0.2)); check it is known."""
    base, _, params = name.strip().partition(":")
    if base not in KNOWN_MODELS:
        names = [*KNOWN_MODELS, *MODELS.user, *MODELS.entry_points()]
        raise ConfigError(
            f"Unknown model '{name}'.{did_you_mean(base, names)} Known models: {', '.join(names)} "
            "(paper CNNs take filters and dropout, e.g. cnn2:128,384,0.2), or your own: "
            "package.module:factory or path/to/file.py:factory."
        )
    if base not in PAPER_MODELS:
        if params:
            raise ConfigError(f"Model '{base}' takes no parameters (got '{name}').")
        return base, ()
    if not params:
        return base, PAPER_MODELS[base]
    want = len(PAPER_MODELS[base])
    try:
        values = [float(v) for v in params.split(",")]
    except ValueError:
        values = []
    filters, dropout = values[:-1], values[-1:] or [-1.0]
    if len(values) != want or any(f < 1 or f != int(f) for f in filters) or not 0 <= dropout[0] < 1:
        example = ",".join(str(v) for v in PAPER_MODELS[base])
        raise ConfigError(
            f"Model '{name}': {base} takes {want - 1} filter counts and a dropout "
            f"in [0, 1), e.g. {base}:{example}."
        )
    return base, (*(int(f) for f in filters), dropout[0])


def check_model_name(name: str) -> None:
    """Refuse a model spec that names nothing (an unknown name, a missing file or module,
    a missing factory) before any work."""
    if is_builtin(name):
        parse_model_name(name)
        return
    spec = parse_spec(name)
    if spec.kind == "name" and MODELS.get(spec.target) is None:
        parse_model_name(name)  # raises, with suggestions
    MODELS.check(name)
