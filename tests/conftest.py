"""Shared fixtures: a real local Ray (loopback only, 2 CPUs, one fake GPU for placement
tests), started once and kept for every test that needs it (a multi-node module shuts it
down for its own cluster; the next test that needs it starts it again), and tiny configs
that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmd_ray.checks import from_dict
from fedmd_ray.config import merge

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep every Ray process of the tests on loopback: without this, Ray swaps 127.0.0.1 for the
# machine's address when a driver joins a multi-node test cluster.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


LOCAL_RAY = {
    "address": "local",  # a fresh Ray of our own, even when another one runs on this machine
    "num_cpus": 2,
    "num_gpus": 1,
    "_node_ip_address": "127.0.0.1",
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
}


@pytest.fixture
def ray_session():
    """The tests' local Ray, started at the first test that needs it (starting Ray costs
    seconds; a test module that needs a cluster of its own shuts this one down first)."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


TINY = {
    "name": "tiny",
    "models": ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2"],
    "data": {
        "public": "synthetic",
        "public_classes": list(range(10)),
        "private": "synthetic",
        "private_classes": list(range(10, 16)),
        "synthetic_train_per_class": 80,
        "synthetic_test_per_class": 30,
    },
    "partition": {"kind": "per_class", "samples_per_class": 3},
    "train": {
        "public_epochs": 2,
        "private_epochs": 10,
        "rounds": 2,
        "public_subset_size": 300,
        "revisit_epochs": 1,
        "upper_bound_epochs": 5,
        "digest_batch_size": 64,
    },
    # CPU even where a real GPU is present: tests give participants shares of Ray's fake GPUs,
    # which with device 'auto' would put them on the real one, and their numbers would differ
    # from the CPU runs they are compared with. Actors kept from one test's run to the next
    # (resources.reuse_actors): a Ray run then costs its work, not three processes importing
    # torch (tests that need fresh actors say so).
    "resources": {"backend": "local", "torch_threads": 1, "device": "cpu", "reuse_actors": True},
}


QUICK = [
    "--set",
    "train.public_epochs=1",
    "--set",
    "train.private_epochs=5",
    "--set",
    "train.upper_bound_epochs=5",
]
"""Command-line overrides that make a preset's run a few seconds' work (tests of the CLI and scripts)."""


def tiny_config(**sections):
    """TINY with nested overrides, e.g. tiny_config(train={"rounds": 3})."""
    return from_dict(merge(TINY, sections))


def numbers(rows):
    """Everything a run computes, from its metrics rows, without timings or notes."""
    return sorted(
        (
            r["round"],
            r["participant"],
            r["phase"],
            r["accuracy"],
            r["loss"],
            r["bytes_sent"],
            r["bytes_received"],
        )
        for r in rows
        if r["participant"] != "*" and r["note"] is None
    )


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def real_data_dir() -> Path | None:
    """FEDMD_DATA_DIR when set, else None: tests that need real data skip without it."""
    value = os.environ.get("FEDMD_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None
