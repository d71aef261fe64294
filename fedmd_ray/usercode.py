"""Users' code, named by specs and imported in isolation.

    NAME                      a built-in or registered name (plugins.py)
    package.module:attr       a module importable here (and, shipped, on every node)
    path/to/file.py:attr      a callable in a file, relative to where the command runs

Any spec may end in `?key=value&...`: keyword arguments, each value read as JSON where it
parses (64, 0.5, true, "x", [1, 2]) and as a string otherwise.

A user's folder is imported as a package of its own, `fedmd_user_<digest of its path>`,
never by putting the folder on sys.path: a `statistics.py` beside a model file does not
replace the standard library's for the rest of the process, and two folders that each hold
`nets.py` importing their own `helpers.py` each get their own. While a file of the folder
runs its imports, a top-level name that is a module, package or subfolder of that folder
means that folder's (as it would when the user runs the file as a script); afterwards the
names are the process's own again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fedmd_ray.errors import ConfigError, did_you_mean

IGNORED = ("__pycache__", ".git", ".venv", ".ipynb_checkpoints")
"""Folders a user's folder is read without (for digests and for shipping)."""


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


def file_spec(text: str) -> Spec | None:
    """`text` as a file spec, or None when it is anything else (a name, a module, a
    dataset form such as npz:PATH)."""
    try:
        spec = parse_spec(text)
    except ConfigError:
        return None
    return spec if spec.kind == "file" else None


@dataclass
class Code:
    """Where shipped user code lives inside an actor: the runtime_env package, and where
    each shipped file and module folder is in it."""

    package: str
    files: dict[str, str] = field(default_factory=dict)
    """File spec target -> its path inside the package."""
    modules: str | None = None
    """The folder inside the package that holds shipped modules (package.module specs)."""

    def root(self) -> Path:
        module = importlib.import_module(self.package)
        return Path(next(iter(module.__path__)))


# ---------------------------------------------------------------- importing in isolation

_LOCK = threading.RLock()


class _Existing(importlib.abc.Loader):
    """Hands the import system a module that is already imported."""

    def __init__(self, module: types.ModuleType):
        self.module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Siblings(importlib.abc.MetaPathFinder):
    """A top-level import of a name the folder holds: that folder's module, as package.name."""

    def __init__(self, folder: Path, package: str, names: set[str]):
        self.folder, self.package, self.names = folder, package, names

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if "." in name or name not in self.names:
            return None
        module = importlib.import_module(f"{self.package}.{name}")
        spec = importlib.machinery.ModuleSpec(name, _Existing(module), is_package=hasattr(module, "__path__"))
        if hasattr(module, "__path__"):
            spec.submodule_search_locations = list(module.__path__)
        return spec


def _names(folder: Path) -> set[str]:
    """Top-level importable names in `folder`: its .py files and its subfolders."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {
        p.name for p in folder.iterdir() if p.is_dir() and p.name.isidentifier() and p.name not in IGNORED
    }
    return names


def folder_package(folder: Path) -> str:
    """The package a user's folder is imported as (stable for the folder's path)."""
    return "fedmd_user_" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]


def _package(folder: Path) -> str:
    package = folder_package(folder)
    if package not in sys.modules:
        module = types.ModuleType(package, f"Users' code from {folder}")
        module.__path__ = [str(folder)]
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[package] = module
    return package


@contextmanager
def _isolated(folder: Path, package: str) -> Iterator[None]:
    """While user code of `folder` imports: its top-level names are the folder's."""
    names = _names(folder)
    hidden = {n: sys.modules.pop(n) for n in list(names) if n in sys.modules}
    before = set(sys.modules)
    finder = _Siblings(folder, package, names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        # The folder's modules stay imported under the package; the plain names they took
        # (and their submodules imported through them) go back to the process.
        for name in set(sys.modules) - before:
            if name.split(".")[0] in names:
                del sys.modules[name]
        sys.modules.update(hidden)


def load_file(path: Path, spec: Spec) -> types.ModuleType:
    """The module of a user's file, imported as part of its folder's own package."""
    if not path.is_file():
        raise ConfigError(
            f"'{spec.text}': file {spec.target} not found (looked at {path.resolve()}). File paths are "
            "relative to where the command runs."
        )
    folder = path.resolve().parent
    with _LOCK:
        package = _package(folder)
        name = f"{package}.{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        try:
            with _isolated(folder, package):
                return importlib.import_module(name)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ConfigError(
                f"'{spec.text}': importing {spec.target} failed: {type(exc).__name__}: {exc}"
            ) from None


def load_module(spec: Spec, code: Code | None = None) -> types.ModuleType:
    """A module spec's module: installed (or standard library) here, or shipped in `code`."""
    try:
        if code is not None and code.modules is not None:
            top = spec.target.split(".")[0]
            folder = code.root() / code.modules
            if (folder / top).exists() or (folder / f"{top}.py").exists():
                with _LOCK, _isolated(folder, _package(folder)):
                    return importlib.import_module(spec.target)
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
            path = code.root() / code.files[spec.target]
        else:
            path = Path(spec.target).expanduser()
        module = load_file(path, spec)
    else:
        module = load_module(spec, code)
    obj = getattr(module, spec.attr or "", None)
    if obj is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(
            f"'{spec.text}': {spec.target} has no '{spec.attr}'.{did_you_mean(spec.attr or '', public)} "
            f"It has: {', '.join(public[:12]) or 'nothing callable'}."
        )
    if not callable(obj):
        raise ConfigError(f"'{spec.text}': '{spec.attr}' in {spec.target} is not callable.")
    return obj


# ---------------------------------------------------------------- where code lives


def _under(origin: str, keys: tuple[str, ...]) -> bool:
    roots = {sysconfig.get_paths()[k] for k in keys}
    return any(Path(origin).resolve().is_relative_to(Path(r).resolve()) for r in roots)


def module_source(top: str, text: str) -> Path | None:
    """The folder (package) or file (module) of top-level module `top`, to ship with the
    run; None when every node has it already: the standard library, built-in modules and
    installed packages (installed there too, or through resources.runtime_env)."""
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(f"'{text}': module '{top}' cannot be found on this machine.")
    if found.origin in (None, "built-in", "frozen") and not found.submodule_search_locations:
        return None
    origin = found.origin or next(iter(found.submodule_search_locations))
    if _under(origin, ("stdlib", "platstdlib", "purelib", "platlib")):
        return None
    path = Path(origin)
    return path.parent if path.name == "__init__.py" else path


def user_files(folder: Path) -> list[Path]:
    """The .py files of a user's folder and its subfolders, in a stable order."""
    return sorted(
        p for p in folder.rglob("*.py") if not any(part in IGNORED for part in p.relative_to(folder).parts)
    )


def code_digests(specs: list[str]) -> dict[str, str]:
    """For each spec naming a user's file or a module that is shipped (not installed), a
    digest of the code it imports with: every .py file of its folder. A resume compares them."""
    out: dict[str, str] = {}
    for text in dict.fromkeys(specs):
        try:
            spec = parse_spec(text)
        except ConfigError:
            continue  # a dataset form (npz:PATH) or a name
        if spec.kind == "file":
            folder = Path(spec.target).expanduser().resolve().parent
        elif spec.kind == "module":
            try:
                source = module_source(spec.target.split(".")[0], text)
            except ConfigError:
                continue
            if source is None:
                continue
            folder = source if source.is_dir() else source.parent
        else:
            continue
        if not folder.is_dir():
            continue
        digest = hashlib.sha256()
        files = user_files(folder) if spec.kind == "file" or source.is_dir() else [source]
        for f in files:
            digest.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
        out[text] = digest.hexdigest()
    return out


def absolute_share_key(text: str) -> str:
    """A resources.per_model key made absolute like the models it names: a file spec, or a
    file's path alone (the name every model of that file shares)."""
    if text.strip().endswith(".py") and ":" not in text:
        return str(Path(text.strip()).expanduser().resolve())
    return absolute(text)


def absolute(text: str) -> str:
    """A file spec (path/to/file.py:attr?...) or a dataset form (npz:PATH, folder:PATH) with
    its path made absolute, so it means the same from any working directory (a Ray Tune
    trial runs in a folder of its own); anything else unchanged."""
    for form in ("npz:", "folder:"):
        if text.startswith(form):
            return form + str(Path(text[len(form) :]).expanduser().resolve())
    spec = file_spec(text)
    if spec is None:
        return text
    query = text.strip().partition("?")[2]
    resolved = f"{Path(spec.target).expanduser().resolve()}:{spec.attr}"
    return resolved + (f"?{query}" if query else "")


def check_call(fn: Any, what: str, hint: str, **kwargs: Any) -> None:
    """A user's callable that cannot take the call fedmd_ray makes is refused with that call
    and its signature (`what` names it, `hint` says what it must take), not with the
    TypeError of a keyword it never heard of."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: its call says for itself
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ConfigError(
            f"{what} is called as {name}({call}) and cannot take that ({exc}); it has the "
            f"signature {name}{signature}. {hint}"
        ) from None
