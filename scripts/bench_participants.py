"""Many participants on few actors: seconds per round and memory as the number of
participants grows (10, 100, 1000 tiny CNNs by default) on a pool of actors, with one actor
per participant side by side where that still fits.

Memory: the actors' proportional set size (PSS, from /proc; shared libraries and the
object store's mapped pages are split among processes), the driver's resident set, and the
participants' states kept in the object store between calls (one state's bytes x N).

    python scripts/bench_participants.py                        # ~10 minutes on 2 cores
    python scripts/bench_participants.py --participants 10,100 --actors 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import ray

from fedmd_ray.config import from_dict
from fedmd_ray.results import seconds_per_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import local_ray, run_sampled, save_rows  # noqa: E402

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
    """Bytes of one participant's state (weights and both optimizers), as the pool stores it."""
    from fedmd_ray.backends import participant_args
    from fedmd_ray.fedmd import participant_specs
    from fedmd_ray.participant import Participant
    from fedmd_ray.tasks import build_task

    small = from_dict({**values, "participants": 2})
    task = build_task(small)
    spec = participant_specs(small, task)[0]
    p = Participant(spec, task.public_train.x, task.public_train.y, *participant_args(task, 0))
    p.transfer()
    p.logits(list(range(50)), 1)  # Adam states exist once both optimizers have stepped
    p.revisit(1)
    return len(p.get_state())


def measure(values: dict, out: Path) -> dict:
    start = time.perf_counter()
    result, pss = run_sampled(values, out=out)
    # One row per (round, phase): at 10 000 participants the full table has ~10^5 rows.
    walls = result.metrics.group_by(["round", "phase"]).aggregate([("wall_seconds", "max")])
    rows = [
        {"round": r["round"], "phase": r["phase"], "wall_seconds": r["wall_seconds_max"]}
        for r in walls.to_pylist()
    ]
    transfer = next(r["wall_seconds"] for r in rows if r["phase"] == "transfer")
    return {
        "seconds_per_round": seconds_per_round(rows),
        "transfer_seconds": transfer,
        "actor_pss_mib": pss,
        "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
    print("participants  actors  s/round  transfer s  actor PSS MiB  states MiB  driver RSS MiB  accuracy")
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
            print(
                f"{n:12d}  {row['actors']:6d}  {m['seconds_per_round']:7.2f}  {m['transfer_seconds']:10.1f}  "
                f"{m['actor_pss_mib']:13.0f}  {states}  {m['driver_rss_mib']:14.0f}  {m['mean_accuracy']:8.1%}",
                flush=True,
            )
    ray.shutdown()
    save_rows(rows, out / "participants.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
