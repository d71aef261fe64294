"""Resumable runs: after a round, every participant's state goes into the run's storage
(checkpoint/round-NNNN/) and the driver writes a manifest naming the round, the files and
their checksums.

`fedmd-ray run --resume DIR` reads the manifest back and refuses one that is damaged, was
written by another version, or under settings that change the numbers: everything that
decides what is computed or who answers in time, the threads each participant computed on
(they decide how torch rounds its sums), and the contents of the user's code files. Where
and how it runs may differ (the backend, actors, GPUs' placement, restarts), and so may the
round count, simulated faults and the run's name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from fedmd_ray.config import Config, flatten, gpu_share
from fedmd_ray.errors import CheckpointError
from fedmd_ray.plugins import code_digests
from fedmd_ray.storage import Storage
from fedmd_ray.usercode import absolute

FOLDER = "checkpoint"
MANIFEST = "latest.json"
FORMAT = 2
"""The checkpoint layout: participant states hold only what training needs (format 1 also
kept what the last scores call measured)."""
FREE_KEYS = (
    "name",
    "faults",
    "checkpoint_every",
    "log",
    "train.rounds",
    "resources.backend",
    "resources.address",
    "resources.num_cpus",
    "resources.max_concurrent",
    "resources.placement",
    "resources.actors",
    "resources.reuse_actors",
    "resources.max_restarts",
    "resources.runtime_env",
    "resources.per_model",
    "resources.mps",
    "data.data_dir",
    "data.download",
)
"""Keys that may change between a run and its resume: none of them changes a number (CPUs
per participant count through the threads they give it, which are compared themselves)."""
_ROUND_FOLDER = re.compile(r"round-\d{4,}")
_STATE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.pt")


def identity(config: Config, threads: int) -> dict[str, Any]:
    """The settings that decide a run's numbers, flattened; the threads each participant
    computes on; a digest of each user code file the config names."""
    flat = flatten(config.to_dict())
    kept = {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in FREE_KEYS)}
    # Whether participants compute on a GPU decides numbers; how much of one each gets does not.
    kept["resources.num_gpus"] = "some" if config.resources.num_gpus > 0 else "none"
    if config.resources.per_model:
        kept["on a GPU"] = [gpu_share(config, m) > 0 for m in config.participant_models()]
    kept["threads per participant"] = threads
    if config.resources.group:  # which participants compute together follows the pool's size
        kept["resources.actors"] = config.resources.actors
    kept.update({f"code {spec}": digest for spec, digest in code_digests(config_specs(config)).items()})
    return kept


def config_specs(config: Config) -> list[str]:
    """The specs in `config` that may name user code."""
    return [
        *config.models,
        config.train.consensus,
        config.train.digest_loss,
        config.data.public,
        config.data.private,
    ]


def fingerprint(identity_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity_, sort_keys=True, default=str).encode()).hexdigest()


def round_folder(round_: int) -> str:
    """Where round `round_`'s states go, inside the run's storage."""
    return f"{FOLDER}/round-{round_:04d}"


def write(storage: Storage, round_: int, identity_: dict[str, Any], participants: dict[str, dict]) -> None:
    """Point the manifest at round `round_` (whose files are written), then drop older rounds."""
    directory = round_folder(round_).split("/", 1)[1]
    manifest = {
        "format": FORMAT,
        "round": round_,
        "fingerprint": fingerprint(identity_),
        "identity": identity_,
        "directory": directory,
        "participants": participants,
    }
    # The manifest moves only once the round is complete.
    storage.write_text(f"{FOLDER}/{MANIFEST}", json.dumps(manifest, indent=2, default=str) + "\n")
    for old in storage.names(FOLDER):
        if _ROUND_FOLDER.fullmatch(old) and old != directory:
            storage.delete(FOLDER, old)


@dataclass(frozen=True)
class Saved:
    """A run's last checkpoint as its manifest describes it."""

    round: int
    folder: str
    """Its folder inside the run's storage."""
    entries: dict[str, dict]
    """Per participant: its state file and checksum."""
    fingerprint: str | None
    identity: dict[str, Any]
    """The settings it was written under (identity())."""

    @property
    def threads(self) -> int | None:
        """The threads each participant computed on."""
        return self.identity.get("threads per participant")


def exists(storage: Storage) -> bool:
    """Whether the run in `storage` has written a checkpoint to resume from."""
    return storage.exists(FOLDER, MANIFEST)


def saved(storage: Storage) -> Saved:
    """The last checkpoint of the run in `storage`, refused when missing, damaged or of
    another version. Reads only the manifest, so a resume that cannot work stops before
    any participant starts."""
    where = storage.location(FOLDER, MANIFEST)
    if not exists(storage):
        raise CheckpointError(
            f"No checkpoint in {storage}: expected {where}. Is it the folder of a run (its --out)?"
        )
    try:
        manifest = json.loads(storage.read_text(FOLDER, MANIFEST))
        round_, entries, directory = int(manifest["round"]), manifest["participants"], manifest["directory"]
        files = {name: entry["file"] for name, entry in entries.items()}
        identity_ = manifest.get("identity", {})
        if not isinstance(identity_, dict):
            raise TypeError(f"its identity is a {type(identity_).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"The checkpoint manifest {where} is damaged ({exc}); start the run afresh."
        ) from None
    # Every path in it must stay inside the run's folder: a manifest is data, not a pointer.
    bad = [v for v in [directory, *files.values()] if not isinstance(v, str)]
    bad += [directory] if isinstance(directory, str) and not _ROUND_FOLDER.fullmatch(directory) else []
    bad += [f for f in files.values() if isinstance(f, str) and not _STATE_FILE.fullmatch(f)]
    if bad:
        raise CheckpointError(
            f"The checkpoint manifest {where} names {bad[0]!r}, which is not a file of this run's "
            "checkpoint folder; start the run afresh."
        )
    if manifest.get("format", 1) != FORMAT:
        raise CheckpointError(
            f"The checkpoint in {storage} was written by another version of fedmd_ray (format "
            f"{manifest.get('format', 1)}; this one reads format {FORMAT}); start the run afresh."
        )
    return Saved(round_, f"{FOLDER}/{directory}", entries, manifest.get("fingerprint"), identity_)


def _absolute(identity_: dict[str, Any]) -> dict[str, Any]:
    """A saved identity with its file specs and dataset paths absolute where this process
    runs, as `identity` now writes them (checkpoints written before kept them as given)."""

    def anchored(value: Any) -> Any:
        return absolute(value) if isinstance(value, str) else value

    return {
        (f"code {absolute(k[5:])}" if k.startswith("code ") else k): (
            [anchored(v) for v in value] if isinstance(value, list) else anchored(value)
        )
        for k, value in identity_.items()
    }


def check(storage: Storage, saved_: Saved, identity_: dict[str, Any], names: list[str]) -> None:
    """Refuse to continue `saved_` under settings that change the numbers (this run's
    `identity_`) or without a state for each of `names`."""
    # The fingerprints differ only in how paths were written (a checkpoint from before paths
    # were recorded absolute) when nothing differs once they are made absolute.
    theirs = _absolute(saved_.identity) if saved_.fingerprint != fingerprint(identity_) else identity_
    changed = sorted(k for k in set(identity_) | set(theirs) if identity_.get(k) != theirs.get(k))
    if changed:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} -> {identity_.get(k)!r})" for k in changed[:5])
        raise CheckpointError(
            f"The checkpoint in {storage} was written under settings that change the numbers: "
            f"{shown}. Resume with the original settings and code (only {', '.join(FREE_KEYS)} "
            "may change; pin resources.torch_threads to resume on a machine of another size), or start afresh."
        )
    missing = [n for n in names if n not in saved_.entries]
    if missing:
        raise CheckpointError(
            f"The checkpoint in {storage} has no state for {missing}; start the run afresh."
        )
