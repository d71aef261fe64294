"""Users' code on every actor, on every node: model, consensus and digest-loss files or
modules named in the config travel with Ray's runtime_env (`py_modules`), together with
whatever the user adds in `resources.runtime_env` (pip packages, env vars, ...).

Each file's folder (its .py files and subfolders, so the file's imports of its neighbours
work) and each module that is neither installed nor in the standard library is copied into
one small package, `fedmd_user_code_<digest>`, which Ray uploads once and unpacks on each
node; inside an actor `usercode.Code` finds the copies there and imports each folder as a
package of its own. Nothing is pickled: a checkpoint names the spec. The copy is removed
when the run ends.

When this run starts Ray (or connects to a cluster), the code goes in the job's runtime_env
(`ray.init(runtime_env=...)`, Ray's public way). A run inside a Ray that is already running
(a notebook, a Ray Tune trial) must name uploaded packages per actor instead, and Ray offers
that only through a private function, kept behind `upload` (tests/test_plugins.py checks it
on the installed Ray).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmd_ray.config import Config
from fedmd_ray.errors import ConfigError
from fedmd_ray.model_names import is_builtin
from fedmd_ray.usercode import Code, module_source, parse_spec, user_files

SIZE_LIMIT_BYTES = 50 * 2**20
UPLOAD_TESTED_WITH = ("2.60.0",)
"""Ray versions whose private upload function `upload` was tested against."""
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", "*.npz", "*.npy", "*.pt")


@dataclass
class Shipment:
    """What a run ships: the runtime_env for every actor, where the code is inside them,
    and the local copy to remove when the run ends."""

    env: dict[str, Any] | None
    code: Code | None
    staged: list[Path] = field(default_factory=list)
    origins: dict[str, Path] = field(default_factory=dict)
    """Where each shipped folder or module came from: 'd0' -> the user's folder, 'm/top' ->
    the module's file or folder."""

    def unship(self, text: str) -> str:
        """`text` (an error, a traceback) naming the user's own files where it names Ray's
        copies of them: the user opens their file at the line, not a folder under /tmp/ray."""
        if self.code is None:
            return text
        pattern = rf"[^\s\"']*/{re.escape(self.code.package)}/(d\d+|m/[A-Za-z_][A-Za-z0-9_]*(?:\.py)?)"
        return re.sub(
            pattern, lambda m: str(self.origins.get(m.group(1).removesuffix(".py"), m.group(0))), text
        )

    def remove(self) -> None:
        for path in self.staged:
            shutil.rmtree(path, ignore_errors=True)
        self.staged = []


def _user_specs(config: Config) -> list[str]:
    found = [m for m in dict.fromkeys(config.models) if not is_builtin(m)]
    found += [config.train.consensus, config.train.digest_loss]
    return [s for s in found if ":" in s.partition("?")[0]]


def user_code(config: Config) -> Shipment:
    """The runtime_env for every actor and where the shipped code is inside them."""
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
            source = module_source(top, text)
            if source is not None:
                modules[top] = source
    if not folders and not modules:
        return Shipment(env or None, None)

    digest = hashlib.sha256()
    for folder in folders:
        for f in user_files(folder):
            digest.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    for top, source in sorted(modules.items()):
        digest.update(top.encode() + str(source).encode())
    package = f"fedmd_user_code_{digest.hexdigest()[:12]}"
    staging = Path(tempfile.mkdtemp(prefix="fedmd-code-"))
    stage = staging / package
    stage.mkdir()
    (stage / "__init__.py").write_text('"""Users\' code, shipped to fedmd_ray actors."""\n')
    for folder, sub in folders.items():
        for f in user_files(folder):
            target = stage / sub / f.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    if modules:
        (stage / "m").mkdir()
        for top, source in modules.items():
            if source.is_dir():
                shutil.copytree(source, stage / "m" / top, ignore=_IGNORE)
            else:
                shutil.copy2(source, stage / "m" / source.name)
    size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    if size > SIZE_LIMIT_BYTES:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(
            f"The user code to ship ({size / 2**20:.0f} MiB from {', '.join(map(str, [*folders, *modules.values()]))}) "
            "is too large; keep model files in a folder of their own, or install the package on every node."
        )
    env["py_modules"] = [*env.get("py_modules", []), str(stage)]
    origins = {sub: folder for folder, sub in folders.items()}
    origins.update({f"m/{top}": source for top, source in modules.items()})
    return Shipment(env, Code(package, files, "m" if modules else None), [staging], origins)


def upload(env: dict[str, Any] | None) -> dict[str, Any] | None:
    """`env` with its local folders uploaded to the running Ray and named by URI: actors of
    a Ray this run did not start take URIs only. Uses Ray's private upload functions (no
    public one exists); tested on the versions in UPLOAD_TESTED_WITH."""
    if not env or not (env.get("py_modules") or env.get("working_dir")):
        return env
    import logging

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = tempfile.mkdtemp(prefix="fedmd-upload-")
    quiet = logging.getLogger("fedmd_ray.shipping")
    try:
        env = upload_py_modules_if_needed(
            dict(env), include_gitignore=True, scratch_dir=scratch, logger=quiet
        )
        return upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch, logger=quiet)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"'resources.runtime_env' could not be shipped to the actors: {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
