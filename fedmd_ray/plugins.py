"""Bring your own: models, datasets, consensus functions and digest losses.

Wherever the config names one of these, it may use a *spec*:

    NAME                              a built-in, or one registered with fedmd_ray.register_*
                                      or by an installed package's entry point
    package.module:attr               a callable importable on every node
    path/to/file.py:attr              a callable in a file, relative to where the command runs

and any of them may end in `?key=value&key=value`: keyword arguments for the callable, each
value read as JSON where it parses (64, 0.5, true, "x", [1, 2]) and as a string otherwise,
e.g. `nets/mine.py:wide?width=64&depth=3`.

On the Ray backend, files and modules that are not installed packages travel to every
actor, on every node, with Ray's runtime_env (backends/shipping.py); a checkpoint records
the spec, never pickled code. A package can add names for every user with entry points in
the groups `fedmd_ray.models`, `fedmd_ray.datasets`, `fedmd_ray.consensus` and
`fedmd_ray.digest_losses`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fedmd_ray.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Spec:
    text: str
    kind: str
    """'name', 'module' or 'file'."""
    target: str
    """The name, the module path, or the file path."""
    attr: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_spec(text: str) -> Spec:
    """'nets/mine.py:wide?width=64' -> Spec('file', 'nets/mine.py', 'wide', {'width': 64})."""
    body, _, query = text.strip().partition("?")
    kwargs = {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    target, colon, attr = body.rpartition(":")
    if not colon:
        return Spec(text, "name", body, None, kwargs)
    if not attr.isidentifier() or not target:
        raise ConfigError(
            f"'{text}' must look like NAME, package.module:function or path/to/file.py:function "
            "(optionally followed by ?key=value&...)."
        )
    kind = "file" if target.endswith(".py") or "/" in target or "\\" in target else "module"
    return Spec(text, kind, target, attr, kwargs)


def is_user_spec(text: str, builtins: tuple[str, ...] = ()) -> bool:
    """Whether `text` names user code (a module or a file) rather than a name."""
    base = text.strip().partition("?")[0]
    head = base.partition(":")[0]
    return ":" in base and head not in builtins


@dataclass
class Code:
    """Where shipped user code lives inside an actor: the runtime_env package, the path of
    each shipped file in it, and the folders that go on sys.path (for sibling imports)."""

    package: str
    files: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    def root(self) -> Path:
        module = importlib.import_module(self.package)
        return Path(next(iter(module.__path__)))

    def activate(self) -> None:
        root = self.root()
        for sub in self.paths:
            folder = str(root / sub)
            if folder not in sys.path:
                sys.path.insert(0, folder)


def _load_file(path: Path, spec: Spec) -> Any:
    if not path.is_file():
        raise ConfigError(
            f"'{spec.text}': file {spec.target} not found (looked at {path.resolve()}). File paths are "
            "relative to where the command runs."
        )
    # A stable module name per file, so two files named nets.py do not collide.
    name = "fedmd_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10] + "_" + path.stem
    module = sys.modules.get(name)
    if module is None:
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the file's own imports of its neighbours
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(
                f"'{spec.text}': importing {spec.target} failed: {type(exc).__name__}: {exc}"
            ) from None
    return module


def _load_module(spec: Spec) -> Any:
    try:
        return importlib.import_module(spec.target)
    except Exception as exc:
        raise ConfigError(
            f"'{spec.text}': cannot import module '{spec.target}' ({type(exc).__name__}: {exc}). "
            "Install it, or name a file instead (path/to/file.py:function)."
        ) from None


def load_callable(spec: Spec, code: Code | None = None) -> Callable[..., Any]:
    """The callable a module or file spec names (inside an actor, from the shipped `code`)."""
    if spec.kind == "file":
        if code is not None and spec.target in code.files:
            code.activate()
            path = code.root() / code.files[spec.target]
        else:
            path = Path(spec.target).expanduser()
        module = _load_file(path, spec)
    else:
        if code is not None:
            code.activate()
        module = _load_module(spec)
    obj = getattr(module, spec.attr or "", None)
    if obj is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(
            f"'{spec.text}': {spec.target} has no '{spec.attr}'.{did_you_mean(spec.attr or '', public)} It has: {', '.join(public[:12]) or 'nothing callable'}."
        )
    if not callable(obj):
        raise ConfigError(f"'{spec.text}': '{spec.attr}' in {spec.target} is not callable.")
    return obj


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
