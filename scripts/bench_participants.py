"""Many participants on few actors: seconds per round and memory as the number of
participants grows (10, 100, 1000 tiny CNNs by default) on a pool of actors, ungrouped and
grouped (resources.group) side by side, with one actor per participant where that still fits.

Memory: the actors' proportional set size (PSS, from /proc; shared libraries and the
object store's mapped pages are split among processes), the driver's resident set, own
heap and mapped store pages (peaks, sampled through the run), the object store's use at each
round's end (Ray's own count; Ray frees objects in batches, so it still holds some of the
round's earlier states then), and the participants' states summed (kept between calls in the
object store, a bundle's states as one object).

    python scripts/bench_participants.py                        # ~10 minutes on 2 cores
    python scripts/bench_participants.py --participants 10,100 --actors 2
    python scripts/bench_participants.py --participants 10000 --group on --rounds 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from fedmd_ray.benchmarking import at_least_one, local_ray, measure, share, synthetic_config


def config(
    participants: int, actors: int | None, rounds: int, participation: float = 1.0, group: bool = False
) -> dict:
    return synthetic_config(
        "tiny",
        participants,
        rounds=rounds,
        public_train=500,
        public_subset=200,
        samples_per_class=2,
        test_per_class=30,
        name="participants",
        train={"private_epochs": 2, "digest_batch_size": 50, "participation": participation},
        resources={"backend": "ray", "actors": actors, "torch_threads": 1, "group": group},
    )


def state_bytes(values: dict) -> list[int]:
    """Bytes of each model's participant state (weights and both optimizers) as the pool ships
    it (`Participant.snapshot`, pickled), in the order of `models`; measured in a Ray worker,
    so that the driver measured here never loads torch."""
    return ray.get(ray.remote(_state_bytes).remote(values))


def _state_bytes(values: dict) -> list[int]:
    import pickle

    from fedmd_ray.checks import from_dict
    from fedmd_ray.fedmd import participant_specs
    from fedmd_ray.participant import Participant
    from fedmd_ray.tasks import build_task, participant_args

    small = from_dict({**values, "participants": len(values["models"])})
    task = build_task(small)
    sizes = []
    for spec in participant_specs(small, task):
        p = Participant(spec, task.public_train.x, task.public_train.y, *participant_args(task, spec.index))
        p.transfer()
        consensus = p.communicate(list(range(50)), 1)
        p.digest(consensus, list(range(50)), 1)  # Adam states exist once both optimizers have stepped
        p.revisit(1)
        sizes.append(len(pickle.dumps(p.snapshot(), protocol=5)))
    return sizes


def counts(text: str) -> list[int]:
    """'10,100,1000' -> [10, 100, 1000]: participant counts, each at least 1."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give participant counts of at least 1, e.g. 10,100")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=counts, default="10,100,1000")
    p.add_argument("--actors", type=at_least_one, default=2, help="pool size")
    p.add_argument(
        "--dedicated-up-to", type=int, default=10, help="also run one actor per participant for N up to this"
    )
    p.add_argument("--rounds", type=at_least_one, default=2)
    p.add_argument(
        "--participation", type=share, default=1.0, help="fraction of participants sampled per round"
    )
    p.add_argument(
        "--group", choices=["off", "on", "both"], default="both", help="pool runs ungrouped, grouped, or both"
    )
    p.add_argument("--out", default="runs/participants")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local_ray()
    two = config(2, None, 1)  # one participant of each model
    state_sizes = state_bytes(two)
    rows = []
    print(
        "a participant's state: "
        + ", ".join(f"{m} {b / 1024:.1f} KiB" for m, b in zip(two["models"], state_sizes))
    )
    print(
        "participants  actors  grouped  s/round  ms/participant-round  transfer s  actor PSS MiB  "
        "states MiB  object store MiB  driver peak MiB (own heap, store pages)  accuracy"
    )
    groups = {"off": [False], "on": [True], "both": [False, True]}[args.group]
    for n in args.participants:
        runs = ([(None, False)] if n <= args.dedicated_up_to else []) + [(args.actors, g) for g in groups]
        for actors, group in runs:
            cfg = config(n, actors, args.rounds, args.participation, group)
            m = measure(cfg, out / f"run-{n}-{actors or n}{'-grouped' if group else ''}")
            sampled = max(1.0, n * args.participation)
            row = {
                **{k: v for k, v in m.row().items() if k != "round_seconds"},
                "actors": actors or n,
                "pool": actors is not None,
                "grouped": group,
                "participation": args.participation,
                "ms_per_participant_round": 1000 * m.seconds_per_round / sampled,
                # models are used in turn: participant i has model i mod len(models)
                "states_mib": sum(state_sizes[i % len(state_sizes)] for i in range(n)) / 2**20
                if actors
                else None,
            }
            rows.append(row)
            states = f"{row['states_mib']:10.1f}" if actors else f"{'(in actors)':>10s}"
            print(
                f"{n:12d}  {row['actors']:6d}  {'yes' if group else 'no':>7s}  {m.seconds_per_round:7.2f}  "
                f"{row['ms_per_participant_round']:20.1f}  {m.transfer_seconds:10.1f}  "
                f"{m.actor_pss_mib or 0:13.0f}  {states}  {m.object_store_mib or 0:16.0f}  "
                f"{m.driver_peak_mib:15.0f} ({m.driver_heap_peak_mib:.0f}, {m.driver_shared_peak_mib:.0f})  "
                f"{m.mean_accuracy:8.1%}",
                flush=True,
            )
    ray.shutdown()
    pq.write_table(pa.Table.from_pylist(rows), out / "participants.parquet")
    print(f"\nwritten: {out / 'participants.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
