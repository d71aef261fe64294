"""How a FedMD round scales: over 1, 2 and 4 Ray nodes (ray.cluster_utils.Cluster on this
machine, participants SPREAD across them), with the number of participants, and with the
public subset size. Prints three tables and writes scaling.parquet to --out.

Memory is the proportional set size (PSS) of all Ray worker processes (actors), the
largest seen at the end of a round, read from /proc (Linux).

    python scripts/bench_scaling.py                  # ~5 minutes on 2 cores
    python scripts/bench_scaling.py --participants 10,100 --subsets 1000,5000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Loopback only: without this, Ray swaps 127.0.0.1 for the machine's address when the
# driver joins a multi-node cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fedmd_ray.benchmarking import local_ray, measure, raylet_pids, synthetic_config  # noqa: E402


def config(participants: int, subset: int, placement: str | None = None, rounds: int = 2) -> dict:
    return synthetic_config(
        "scaling",
        participants,
        rounds=rounds,
        public_train=max(3000, subset + 10),
        public_subset=subset,
        samples_per_class=1 if participants > 40 else 3,
        test_per_class=30,
        name="scaling",
        train={"digest_batch_size": 128},
        resources={"backend": "ray", "placement": placement},
    )


def sample(values: dict, out: Path, raylets: set[int] | None = None) -> dict:
    m = measure(values, out, raylets=raylets)
    rows = m.result.metrics.to_pylist()
    moved = (
        sum(r["bytes_sent"] + r["bytes_received"] for r in rows if r["round"] >= 1) / m.config.train.rounds
    )
    return {
        "seconds_per_round": m.seconds_per_round,
        "actor_pss_mib": m.actor_pss_mib,
        "mib_moved_per_round": moved / 2**20,
        "total_seconds": m.total_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="1,2,4")
    p.add_argument(
        "--participants",
        default="5,10,20",
        help="one actor each: ~480 MiB per actor with torch's CUDA build (see bench_participants.py)",
    )
    p.add_argument("--subsets", default="500,1000,2000,4000")
    p.add_argument("--out", default="runs/scaling")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    print("nodes  CPUs/node  participants  s/round  actor PSS MiB")
    for nodes in [int(n) for n in args.nodes.split(",") if n]:
        # Ray wants whole CPUs per node: with 4 nodes, 4 logical CPUs share the 2 real cores.
        cpus = max(1, 2 // nodes)
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": cpus, "node_ip_address": "127.0.0.1"}
        )
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        m = sample(config(10, 1000, "SPREAD"), out / f"nodes-{nodes}", raylet_pids(cluster.list_all_nodes()))
        ray.shutdown()
        cluster.shutdown()
        rows.append({"sweep": "nodes", "nodes": nodes, "participants": 10, "subset": 1000, **m})
        print(
            f"{nodes:5d}  {cpus:9d}  {10:12d}  {m['seconds_per_round']:7.2f}  {m['actor_pss_mib']:13.0f}",
            flush=True,
        )

    local_ray()
    print("\nparticipants  s/round  actor PSS MiB  MiB moved/round")
    for n in [int(x) for x in args.participants.split(",") if x]:
        m = sample(config(n, 1000), out / f"participants-{n}")
        rows.append({"sweep": "participants", "nodes": 1, "participants": n, "subset": 1000, **m})
        print(
            f"{n:12d}  {m['seconds_per_round']:7.2f}  {m['actor_pss_mib']:13.0f}  {m['mib_moved_per_round']:15.2f}",
            flush=True,
        )
    print("\npublic subset  s/round  actor PSS MiB  MiB moved/round")
    for subset in [int(x) for x in args.subsets.split(",") if x]:
        m = sample(config(10, subset), out / f"subset-{subset}")
        rows.append({"sweep": "subset", "nodes": 1, "participants": 10, "subset": subset, **m})
        print(
            f"{subset:13d}  {m['seconds_per_round']:7.2f}  {m['actor_pss_mib']:13.0f}  "
            f"{m['mib_moved_per_round']:15.2f}",
            flush=True,
        )
    ray.shutdown()
    pq.write_table(pa.Table.from_pylist(rows), out / "scaling.parquet")
    print(f"\nwritten: {out / 'scaling.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
