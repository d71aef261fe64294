"""What the benchmarks in scripts/ share: one synthetic FedMD config sized by its
arguments, the argument types their command lines share, and one helper that runs a
config and measures it (seconds per round, the
driver's and the actors' memory, the object store, the GPU). Nothing here is timed in a
test: these machines are noisy, so the scripts print ratios measured side by side."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmd_ray.checks import from_dict
from fedmd_ray.config import Config, merge
from fedmd_ray.fedmd import RunResult, run
from fedmd_ray.phases import Phase
from fedmd_ray.presets import PAPER_MODELS, PRESETS
from fedmd_ray.procfs import children_pss_bytes, status_bytes
from fedmd_ray.results import seconds_per_round


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (participants, rounds, actors), so
    that `--participants 0` is refused on the command line before any work starts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return value


def share(text: str) -> float:
    """An argparse type: a fraction in (0, 1] (a GPU share, a participation rate)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction above 0 and at most 1, e.g. 0.1")
    return value


MODEL_SETS: dict[str, list[str]] = {
    "small": PRESETS["smoke"]["models"],
    "paper": PAPER_MODELS,
    "mixed": [
        *PAPER_MODELS[:6],
        "resnet18",
        "mobilenet_v3_small",
        "shufflenet_v2_x0_5",
        "cnn3:64,128,192,0.2",
    ],
    # Many participants: models a round of which is mostly per-call overhead.
    "tiny": ["cnn2:4,8,0.0", "cnn3:4,8,8,0.0"],
    "scaling": ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2", "cnn3:8,8,16,0.1"],
}


def synthetic_config(
    models: str | list[str] = "small",
    participants: int = 10,
    rounds: int = 2,
    image_size: int = 16,
    public_train: int = 600,
    public_subset: int = 300,
    samples_per_class: int = 3,
    test_per_class: int = 60,
    **sections: Any,
) -> dict[str, Any]:
    """A FedMD run on synthetic images (10 public classes, 6 private), sized by the
    arguments; `sections` are merged over it (e.g. resources={"backend": "local"})."""
    chosen = MODEL_SETS[models] if isinstance(models, str) else list(models)
    values = {
        "name": "bench",
        "seed": 0,
        "checkpoint_every": 0,  # no state files: the work measured is FedMD's
        "models": chosen[:participants],  # in turn, when there are more participants
        "participants": participants,
        "data": {
            "public": "synthetic",
            "public_classes": list(range(10)),
            "private": "synthetic",
            "private_classes": list(range(10, 16)),
            "synthetic_image_size": image_size,
            # enough private samples of each class for every participant's share
            "synthetic_train_per_class": max(public_train // 10, participants * samples_per_class + 50),
            "synthetic_test_per_class": test_per_class,
            "public_train_size": public_train,
        },
        "partition": {"kind": "per_class", "samples_per_class": samples_per_class},
        "train": {
            "public_epochs": 1,
            "private_epochs": 5,
            "rounds": rounds,
            "public_subset_size": public_subset,
            "revisit_epochs": 1,
            "upper_bound": False,
        },
    }
    return merge(values, sections)


def local_ray(num_cpus: int | None = 2, **kwargs: Any) -> None:
    """A Ray of the benchmark's own on loopback, never a cluster already running here."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )


def raylet_pids(nodes: list | None = None) -> set[int]:
    """The raylets of this process's Ray (every node of a Cluster, or the local ray.init)."""
    if nodes is None:
        import ray._private.worker as worker

        nodes = [worker._global_node]
    return {info.process.pid for node in nodes for info in node.all_processes.get("raylet", [])}


def object_store_mib() -> float | None:
    """The object store's use, as Ray counts it (all nodes of this driver's Ray)."""
    import ray
    from ray._private.internal_api import memory_summary

    address = ray.get_runtime_context().gcs_address
    found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address, stats_only=True))
    return float(found.group(1)) if found else None


def nvidia_smi(query: str) -> list[list[str]]:
    """Rows of `nvidia-smi --query-...=...` (e.g. 'gpu=utilization.gpu,memory.used' or
    'compute-apps=pid,used_memory'); [] without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


class Sampler:
    """Samples, every `every` seconds while a run lasts: the driver's resident set, its own
    heap and the object store's pages it has mapped in (shared memory, counted in the
    resident set but owned by the store; ru_maxrss would carry an earlier run's peak), and
    with `gpu` the GPU's use and each process's GPU memory (each Ray actor is a process: its
    peak is the memory per actor, CUDA context included)."""

    def __init__(self, gpu: bool = False, every: float = 0.2):
        self.gpu, self.every = gpu, every
        self.driver_peak = status_bytes("VmRSS") or 0
        self.driver_heap_peak = status_bytes("RssAnon") or 0
        self.driver_shared_peak = status_bytes("RssShmem") or 0
        self.gpu_busy: list[float] = []
        self.gpu_used_peak_mib = 0.0
        self.gpu_process_peak_mib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.driver_peak = max(self.driver_peak, status_bytes("VmRSS") or 0)
            self.driver_heap_peak = max(self.driver_heap_peak, status_bytes("RssAnon") or 0)
            self.driver_shared_peak = max(self.driver_shared_peak, status_bytes("RssShmem") or 0)
            if self.gpu:
                self._sample_gpu()

    def _sample_gpu(self) -> None:
        try:
            for util, used in nvidia_smi("gpu=utilization.gpu,memory.used")[:1]:
                self.gpu_busy.append(float(util))
                self.gpu_used_peak_mib = max(self.gpu_used_peak_mib, float(used))
            for pid, mib in nvidia_smi("compute-apps=pid,used_memory"):
                peak = self.gpu_process_peak_mib.get(int(pid), 0.0)
                self.gpu_process_peak_mib[int(pid)] = max(peak, float(mib))
        except ValueError:
            self.gpu = False  # a driver that answers something else: stop asking

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def gpu_report(self) -> dict[str, float | int | None]:
        peaks = sorted(self.gpu_process_peak_mib.values())
        return {
            "gpu_busy_percent": float(np.mean(self.gpu_busy)) if self.gpu_busy else None,
            "gpu_processes": len(peaks),
            "gpu_mib_per_process_median": float(np.median(peaks)) if peaks else None,
            "gpu_mib_per_process_max": max(peaks) if peaks else None,
            "gpu_mib_used_peak": self.gpu_used_peak_mib or None,
        }


@dataclass
class Measured:
    """One measured run."""

    result: RunResult
    config: Config
    total_seconds: float
    seconds_per_round: float
    round_seconds: list[float]
    transfer_seconds: float
    window: int
    """How many participants computed at once (1 on the local backend), read from the run."""
    driver_peak_mib: float
    driver_heap_peak_mib: float
    driver_shared_peak_mib: float = 0.0
    """The object store's pages in the driver's resident set (shared memory, not the driver's own)."""
    actor_pss_mib: float | None = None
    object_store_mib: float | None = None
    gpu: dict = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean([r.fedmd_final for r in self.result.summary]))

    def row(self) -> dict[str, Any]:
        """The numbers, for a table or a Parquet file."""
        return {
            "backend": self.config.resources.backend,
            "participants": self.config.num_participants,
            "total_seconds": self.total_seconds,
            "seconds_per_round": self.seconds_per_round,
            "round_seconds": self.round_seconds,
            "transfer_seconds": self.transfer_seconds,
            "window": self.window,
            "driver_peak_mib": self.driver_peak_mib,
            "driver_heap_peak_mib": self.driver_heap_peak_mib,
            "driver_shared_peak_mib": self.driver_shared_peak_mib,
            "actor_pss_mib": self.actor_pss_mib,
            "object_store_mib": self.object_store_mib,
            "mean_accuracy": self.mean_accuracy,
            **self.gpu,
        }


def measure(
    values: dict[str, Any] | Config,
    out: str | Path,
    task: Any = None,
    gpu: bool = False,
    raylets: set[int] | None = None,
) -> Measured:
    """Run `values` into `out` and measure it; on Ray, the actors' memory (PSS of the
    processes `raylets` started, default this driver's) and the object store are read at
    every round's end."""
    config = values if isinstance(values, Config) else from_dict(values)
    on_ray = config.resources.backend == "ray"
    pss: list[float] = []
    store: list[float] = []

    def at_round_end(_round: int, _summary: object) -> None:
        if on_ray:
            pss.append(children_pss_bytes(raylets or raylet_pids()) / 2**20)
            store.append(object_store_mib() or 0.0)

    start = time.perf_counter()
    with Sampler(gpu) as sampler:
        result = run(config, out, progress=None, task=task, on_round=at_round_end)
    total = time.perf_counter() - start
    # One row per (round, phase): at 10 000 participants the full table has ~10^5 rows.
    walls = result.metrics.group_by(["round", "phase"]).aggregate([("wall_seconds", "max")])
    rows = [
        {"round": r["round"], "phase": r["phase"], "wall_seconds": r["wall_seconds_max"]}
        for r in walls.to_pylist()
    ]
    per_round: dict[int, float] = {}
    for r in rows:
        if r["round"] >= 1 and r["wall_seconds"] is not None:
            per_round[r["round"]] = per_round.get(r["round"], 0.0) + r["wall_seconds"]
    transfer = next((r["wall_seconds"] for r in rows if r["phase"] == Phase.TRANSFER), 0.0)
    placement = Path(out) / "placement.json"
    window = 1
    if on_ray:
        window = json.loads(placement.read_text()).get("window") or config.num_participants
    return Measured(
        result=result,
        config=config,
        total_seconds=total,
        seconds_per_round=seconds_per_round(rows),
        round_seconds=[per_round[k] for k in sorted(per_round)],
        transfer_seconds=transfer,
        window=window,
        driver_peak_mib=sampler.driver_peak / 2**20,
        driver_heap_peak_mib=sampler.driver_heap_peak / 2**20,
        driver_shared_peak_mib=sampler.driver_shared_peak / 2**20,
        actor_pss_mib=max(pss) if pss else None,
        object_store_mib=max(store) if store else None,
        gpu=sampler.gpu_report() if gpu else {},
    )
