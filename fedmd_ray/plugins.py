"""Bring your own: models, datasets, consensus functions and digest losses.

Wherever the config names one of these, it may use a *spec* (usercode.py): a name (a
built-in, one registered with fedmd_ray.register_*, or an installed package's entry point),
package.module:attr, or path/to/file.py:attr, with ?key=value options, e.g.
`nets/mine.py:wide?width=64&depth=3`.

On the Ray backend, files (with their folder) and modules that are not installed packages
travel to every actor, on every node, with Ray's runtime_env (backends/shipping.py); a
checkpoint records the spec and a digest of the code, never pickled code. A package can add names for every user with entry points in
the groups `fedmd_ray.models`, `fedmd_ray.datasets`, `fedmd_ray.consensus` and
`fedmd_ray.digest_losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmd_ray.errors import ConfigError, did_you_mean
from fedmd_ray.usercode import Code, Spec, code_digests, load_callable, parse_spec

__all__ = [
    "CONSENSUS",
    "DATASETS",
    "DIGEST_LOSSES",
    "MODELS",
    "Code",
    "Registry",
    "Spec",
    "carried",
    "code_digests",
    "parse_spec",
]


class Registry:
    """Names of one kind (models, datasets, consensus, digest losses): the built-ins, those a
    program registers, and those installed packages declare as entry points."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self.builtin: dict[str, Any] = {}
        self.user: dict[str, Any] = {}
        self._entry_points: dict[str, Any] | None = None

    def add_builtin(self, name: str, obj: Any) -> Any:
        self.builtin[name] = obj
        return obj

    def register(self, name: str, obj: Any) -> Any:
        if not name or ":" in name or "?" in name:
            raise ConfigError(f"A {self.kind} name must be plain (no ':' or '?'), got {name!r}.")
        if name in self.builtin:
            raise ConfigError(f"'{name}' is a built-in {self.kind}; register yours under another name.")
        if not callable(obj):
            raise ConfigError(f"register: {name!r} must be given a callable, got {type(obj).__name__}.")
        self.user[name] = obj
        return obj

    def entry_points(self) -> dict[str, Any]:
        if self._entry_points is None:
            from importlib.metadata import entry_points

            self._entry_points = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._entry_points

    def names(self) -> list[str]:
        return [*self.builtin, *self.user, *(n for n in self.entry_points() if n not in self.user)]

    def get(self, name: str) -> Any | None:
        if name in self.builtin:
            return self.builtin[name]
        if name in self.user:
            return self.user[name]
        ep = self.entry_points().get(name)
        if ep is not None:
            try:
                return ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"{self.kind} '{name}' (entry point {ep.value}) failed to load: {exc}"
                ) from None
        return None

    def unknown(self, text: str) -> ConfigError:
        names = self.names()
        return ConfigError(
            f"Unknown {self.kind} '{text}'.{did_you_mean(parse_spec(text).target, names)} Known: {', '.join(names)}; or name your own as "
            "package.module:function or path/to/file.py:function."
        )

    def resolve(self, text: str, code: Code | None = None) -> tuple[Callable[..., Any], dict[str, Any]]:
        """(callable, keyword arguments) for a spec."""
        spec = parse_spec(text)
        if spec.kind == "name":
            obj = self.get(spec.target)
            if obj is None:
                raise self.unknown(text)
            return obj, spec.kwargs
        return load_callable(spec, code), spec.kwargs

    def check(self, text: str) -> None:
        """Refuse a spec that names nothing, before any work (on the driver)."""
        self.resolve(text)


MODELS = Registry("model", "fedmd_ray.models")
DATASETS = Registry("dataset", "fedmd_ray.datasets")
CONSENSUS = Registry("consensus", "fedmd_ray.consensus")
DIGEST_LOSSES = Registry("digest loss", "fedmd_ray.digest_losses")

BUILTIN_DIGEST_LOSSES = ("mae", "mse", "kl")
"""The digest losses participant.py implements: MAE or MSE on logits, KL on softened scores."""
for _name in BUILTIN_DIGEST_LOSSES:
    DIGEST_LOSSES.add_builtin(_name, _name)


def register_model(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    """Make `factory(num_classes=..., image_shape=(C, H, W), **kwargs) -> nn.Module` usable
    as `models=["NAME"]` (or `NAME?key=value`). `image_shape` is the shape of one input
    sample, whatever it holds (features (F,), token ids (T,), images (C, H, W))."""
    return MODELS.register(name, factory)


def register_dataset(name: str, loader: Callable[..., Any]) -> Callable[..., Any]:
    """Make `loader(train: bool, data_dir: str | None, download: bool, **kwargs)` usable as
    `data.public` / `data.private`. It returns (x, y) arrays or an ArrayDataset."""
    return DATASETS.register(name, loader)


def register_consensus(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Make `function(scores, weights=None, **options) -> (samples, classes)` usable as
    `train.consensus`; scores are (participants, samples, classes) float32."""
    return CONSENSUS.register(name, function)


def register_digest_loss(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Make `function(outputs, target) -> scalar tensor` usable as `train.digest_loss`."""
    return DIGEST_LOSSES.register(name, function)


def carried(registry: Registry, text: str) -> Any | None:
    """A user-registered callable travels to actors with the call (pickled by Ray), since
    actors do not run the driver's register_* calls; everything else is found by name."""
    name = text.strip().partition("?")[0]
    return None if ":" in name else registry.user.get(name)
