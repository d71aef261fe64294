"""Resumable runs: after a round, every participant writes its state into the run directory
and the driver writes a manifest naming the round, the files and their checksums.

`fedmd-ray run --resume DIR` reads the manifest back, refuses one that is damaged or was
written under a different configuration, and the run goes on from the next round. Settings
that do not change the numbers (where and how it runs, the round count, simulated faults)
may differ on resume.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fedmd_ray.config import Config, flatten
from fedmd_ray.errors import CheckpointError
from fedmd_ray.files import atomic_write

FOLDER = "checkpoint"
MANIFEST = "latest.json"
FORMAT = 2
"""The checkpoint layout: participant states hold only what training needs (format 1 also
kept what the last scores call measured)."""
FREE_KEYS = ("name", "faults", "checkpoint_every", "resources", "train.rounds")
"""Keys that may change between a run and its resume."""


def identity(config: Config) -> dict[str, Any]:
    """The settings that decide a run's numbers, flattened."""
    flat = flatten(config.to_dict())
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in FREE_KEYS)}


def fingerprint(config: Config) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()


def round_dir(out_dir: Path, round_: int) -> Path:
    return Path(out_dir) / FOLDER / f"round-{round_:04d}"


def write(out_dir: Path, round_: int, config: Config, participants: dict[str, dict]) -> None:
    """Point the manifest at round `round_` (whose files are written), then drop older rounds."""
    folder = Path(out_dir) / FOLDER
    manifest = {
        "format": FORMAT,
        "round": round_,
        "fingerprint": fingerprint(config),
        "identity": identity(config),
        "directory": round_dir(out_dir, round_).name,
        "participants": participants,
    }
    # The manifest moves only once the round is complete.
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    atomic_write(folder / MANIFEST, lambda p: p.write_text(text))
    for old in folder.glob("round-*"):
        if old.name != manifest["directory"]:
            shutil.rmtree(old, ignore_errors=True)


def read(out_dir: Path, config: Config, names: list[str]) -> tuple[int, Path, dict[str, dict]]:
    """(round, folder, participant entries) of the run in `out_dir`, checked against `config`."""
    path = Path(out_dir) / FOLDER / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint in {out_dir}: expected {path}. The run stopped before its first "
            "checkpoint (after transfer learning) or ran with checkpoint_every=0; start it afresh."
        )
    try:
        manifest = json.loads(path.read_text())
        round_, entries, folder = manifest["round"], manifest["participants"], manifest["directory"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"The checkpoint manifest {path} is damaged ({exc}); start the run afresh."
        ) from None
    if manifest.get("format", 1) != FORMAT:
        raise CheckpointError(
            f"The checkpoint in {out_dir} was written by another version of fedmd_ray (format "
            f"{manifest.get('format', 1)}; this one reads format {FORMAT}); start the run afresh."
        )
    if manifest.get("fingerprint") != fingerprint(config):
        ours = identity(config)
        theirs = manifest.get("identity", {})
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        shown = ", ".join(f"{k} ({theirs.get(k)!r} -> {ours.get(k)!r})" for k in changed[:5])
        raise CheckpointError(
            f"The checkpoint in {out_dir} was written under a different configuration: {shown or 'unknown'}. "
            f"Resume with the original settings (only {', '.join(FREE_KEYS)} may change), or start afresh."
        )
    missing = [n for n in names if n not in entries]
    if missing:
        raise CheckpointError(
            f"The checkpoint in {out_dir} has no state for {missing}; start the run afresh."
        )
    return int(round_), Path(out_dir) / FOLDER / folder, entries
