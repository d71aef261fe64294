"""Many participants on few actors: seconds per round and memory as the number of
participants grows (10, 100, 1000 tiny CNNs by default) on a pool of actors, with one actor
per participant side by side where that still fits.

Memory: the actors' proportional set size (PSS, from /proc; shared libraries and the
object store's mapped pages are split among processes), the driver's resident set (peak,
sampled through the run), the object store's use at each round's end (Ray's own count), and
one state's bytes x N (the participants' states kept there between calls).

    python scripts/bench_participants.py                        # ~10 minutes on 2 cores
    python scripts/bench_participants.py --participants 10,100 --actors 2
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from pathlib import Path

import ray

from fedmd_ray import run
from fedmd_ray.config import from_dict
from fedmd_ray.results import seconds_per_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import actor_pss_mib, local_ray, save_rows  # noqa: E402

MODELS = ["cnn2:4,8,0.0", "cnn3:4,8,8,0.0"]


def config(participants: int, actors: int | None, rounds: int, participation: float = 1.0) -> dict:
    return {
        "name": "participants",
        "models": MODELS,
        "participants": participants,
        "checkpoint_every": 0,
        "data": {
            "public": "synthetic",
            "public_classes": list(range(10)),
            "private": "synthetic",
            "private_classes": list(range(10, 16)),
            "synthetic_image_size": 16,
            "synthetic_train_per_class": max(300, 2 * participants + 50),
            "synthetic_test_per_class": 30,
            "public_train_size": 500,
        },
        "partition": {"kind": "per_class", "samples_per_class": 2},
        "train": {
            "public_epochs": 1,
            "private_epochs": 2,
            "rounds": rounds,
            "public_subset_size": 200,
            "digest_batch_size": 50,
            "revisit_epochs": 1,
            "upper_bound": False,
            "participation": participation,
        },
        "resources": {"backend": "ray", "actors": actors, "torch_threads": 1},
    }


def state_bytes(values: dict) -> int:
    """Bytes of one participant's state (weights and both optimizers), as the pool stores it;
    measured in a Ray worker, so that the driver measured here never loads torch."""
    return ray.get(ray.remote(_state_bytes).remote(values))


def _state_bytes(values: dict) -> int:
    from fedmd_ray.fedmd import participant_specs
    from fedmd_ray.participant import Participant
    from fedmd_ray.tasks import build_task, participant_args

    small = from_dict({**values, "participants": 2})
    task = build_task(small)
    spec = participant_specs(small, task)[0]
    p = Participant(spec, task.public_train.x, task.public_train.y, *participant_args(task, 0))
    p.transfer()
    p.logits(list(range(50)), 1)  # Adam states exist once both optimizers have stepped
    p.revisit(1)
    return len(p.get_state())


def resident_mib(field: str = "VmRSS") -> float:
    """VmRSS: all resident pages, shared libraries' file pages included (torch's are ~0.7
    GiB, shared with every process that maps them); RssAnon: the process's own heap."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def object_store_mib() -> float | None:
    """The object store's use, as Ray counts it (all nodes)."""
    from ray._private.internal_api import memory_summary

    found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else None


class DriverPeak:
    """The driver's resident memory, sampled every 0.2 s while a run lasts (ru_maxrss would
    carry the peak of an earlier, larger run in the same process)."""

    def __init__(self) -> None:
        self.peak = resident_mib()
        self.private_peak = resident_mib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, resident_mib())
            self.private_peak = max(self.private_peak, resident_mib("RssAnon"))

    def __enter__(self) -> DriverPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(values: dict, out: Path) -> dict:
    start = time.perf_counter()
    pss: list[float] = []
    store: list[float] = []

    def on_round(round_: int, _: object) -> None:
        pss.append(actor_pss_mib(None) or 0.0)
        store.append(object_store_mib() or 0.0)

    with DriverPeak() as driver:
        result = run(from_dict(values), out, progress=None, on_round=on_round)
    # One row per (round, phase): at 10 000 participants the full table has ~10^5 rows.
    walls = result.metrics.group_by(["round", "phase"]).aggregate([("wall_seconds", "max")])
    rows = [
        {"round": r["round"], "phase": r["phase"], "wall_seconds": r["wall_seconds_max"]}
        for r in walls.to_pylist()
    ]
    transfer = next(r["wall_seconds"] for r in rows if r["phase"] == "transfer")
    rounds = [r for r in rows if r["round"] >= 1 and r["phase"] not in ("transfer", "upper_bound")]
    return {
        "seconds_per_round": seconds_per_round(rows),
        "round_seconds": [
            sum(r["wall_seconds"] for r in rounds if r["round"] == k)
            for k in sorted({r["round"] for r in rounds})
        ],
        "transfer_seconds": transfer,
        "actor_pss_mib": max(pss) if pss else None,
        "object_store_mib": max(store) if store else None,
        "driver_peak_mib": driver.peak,
        "driver_private_peak_mib": driver.private_peak,
        "mean_accuracy": sum(r["fedmd_final"] for r in result.summary) / len(result.summary),
        "total_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", default="10,100,1000")
    p.add_argument("--actors", type=int, default=2, help="pool size")
    p.add_argument(
        "--dedicated-up-to", type=int, default=10, help="also run one actor per participant for N up to this"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--participation", type=float, default=1.0, help="fraction of participants sampled per round"
    )
    p.add_argument("--out", default="runs/participants")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local_ray()
    one_state = state_bytes(config(2, None, 1))
    rows = []
    print(f"one participant's state: {one_state / 1024:.1f} KiB")
    print(
        "participants  actors  s/round  ms/participant-round  transfer s  actor PSS MiB  "
        "states MiB  object store MiB  driver peak MiB (own heap)  accuracy"
    )
    for n in [int(x) for x in args.participants.split(",")]:
        for actors in ([None] if n <= args.dedicated_up_to else []) + [args.actors]:
            m = measure(config(n, actors, args.rounds, args.participation), out / f"run-{n}-{actors or n}")
            row = {
                "participants": n,
                "actors": actors or n,
                "pool": actors is not None,
                "participation": args.participation,
                "states_mib": one_state * n / 2**20 if actors else None,
                **m,
            }
            rows.append(row)
            states = f"{row['states_mib']:10.1f}" if actors else f"{'(in actors)':>10s}"
            sampled = max(1.0, n * args.participation)
            print(
                f"{n:12d}  {row['actors']:6d}  {m['seconds_per_round']:7.2f}  "
                f"{1000 * m['seconds_per_round'] / sampled:20.1f}  {m['transfer_seconds']:10.1f}  "
                f"{m['actor_pss_mib']:13.0f}  {states}  {m['object_store_mib']:16.0f}  "
                f"{m['driver_peak_mib']:15.0f} ({m['driver_private_peak_mib']:.0f})  {m['mean_accuracy']:8.1%}",
                flush=True,
            )
    ray.shutdown()
    save_rows(rows, out / "participants.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
