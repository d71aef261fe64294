"""Users' code on every actor, on every node: model, consensus and digest-loss files or
modules named in the config travel with Ray's runtime_env (`py_modules`), together with
whatever the user adds in `resources.runtime_env` (pip packages, env vars, ...).

Each file's folder (its .py files, so the file's imports of its neighbours work) and each
module that is not an installed package is copied into one small package,
`fedmd_user_code_<hash>`, which Ray uploads once and unpacks on each node; inside an actor
`plugins.Code` finds the copies there. Nothing is pickled: a checkpoint names the spec.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from fedmd_ray.config import Config
from fedmd_ray.errors import ConfigError
from fedmd_ray.model_names import is_builtin
from fedmd_ray.plugins import Code, parse_spec

SIZE_LIMIT_BYTES = 50 * 2**20
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", "*.npz", "*.npy", "*.pt")


def _user_specs(config: Config) -> list[str]:
    found = [m for m in dict.fromkeys(config.models) if not is_builtin(m)]
    found += [config.train.consensus, config.train.digest_loss]
    return [s for s in found if ":" in s.partition("?")[0]]


def _installed(origin: str) -> bool:
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return any(Path(origin).resolve().is_relative_to(Path(r).resolve()) for r in roots)


def _module_source(top: str, text: str) -> Path | None:
    """The folder (package) or file (module) of top-level module `top`; None when it is an
    installed package, which every node is expected to have (or get through runtime_env)."""
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin in (None, "built-in", "frozen"):
        raise ConfigError(f"'{text}': module '{top}' cannot be found on this machine.")
    if _installed(found.origin):
        return None
    origin = Path(found.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def user_code(config: Config, staging_root: Path | None = None) -> tuple[dict[str, Any] | None, Code | None]:
    """(runtime_env for every actor, where the shipped code is inside them)."""
    env = dict(config.resources.runtime_env or {})
    folders: dict[Path, str] = {}
    files: dict[str, str] = {}
    modules: dict[str, Path] = {}
    for text in _user_specs(config):
        spec = parse_spec(text)
        if spec.kind == "file":
            path = Path(spec.target).expanduser().resolve()
            sub = folders.setdefault(path.parent, f"d{len(folders)}")
            files[spec.target] = f"{sub}/{path.name}"
        else:
            top = spec.target.split(".")[0]
            source = _module_source(top, text)
            if source is not None:
                modules[top] = source
    if not folders and not modules:
        return env or None, None

    digest = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.glob("*.py")):
            digest.update(f.name.encode() + f.read_bytes())
    for top, source in sorted(modules.items()):
        digest.update(top.encode() + str(source).encode())
    package = f"fedmd_user_code_{digest.hexdigest()[:12]}"
    stage = Path(staging_root or tempfile.mkdtemp(prefix="fedmd-code-")) / package
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    (stage / "__init__.py").write_text('"""Users\' code, shipped to fedmd_ray actors."""\n')
    paths = []
    for folder, sub in folders.items():
        (stage / sub).mkdir()
        for f in folder.glob("*.py"):
            shutil.copy2(f, stage / sub / f.name)
        paths.append(sub)
    if modules:
        (stage / "m").mkdir()
        for top, source in modules.items():
            if source.is_dir():
                shutil.copytree(source, stage / "m" / top, ignore=_IGNORE)
            else:
                shutil.copy2(source, stage / "m" / source.name)
        paths.append("m")
    size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    if size > SIZE_LIMIT_BYTES:
        raise ConfigError(
            f"The user code to ship ({size / 2**20:.0f} MiB from {', '.join(map(str, [*folders, *modules.values()]))}) "
            "is too large; keep model files in a folder of their own, or install the package on every node."
        )
    env["py_modules"] = [*env.get("py_modules", []), str(stage)]
    return env, Code(package, files, paths)


def uploaded(env: dict[str, Any] | None) -> dict[str, Any] | None:
    """`env` with its local folders uploaded to the cluster and named by URI: Ray takes
    local paths only in ray.init's job-wide runtime_env, and a run may be joining a Ray
    that is already running (a notebook, a Tune trial), so actors get URIs."""
    if not env or not (env.get("py_modules") or env.get("working_dir")):
        return env
    import inspect
    import logging

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = tempfile.mkdtemp(prefix="fedmd-upload-")
    quiet = logging.getLogger("fedmd_ray.shipping")
    env = dict(env)
    for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
        extra = (
            {"include_gitignore": True} if "include_gitignore" in inspect.signature(upload).parameters else {}
        )
        try:
            env = upload(env, scratch_dir=scratch, logger=quiet, **extra)
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"'resources.runtime_env' could not be shipped to the actors: {exc}") from None
    return env
