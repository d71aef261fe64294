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
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Loopback only: without this, Ray swaps 127.0.0.1 for the machine's address when the
# driver joins a multi-node cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fedmd_ray import RunResult, run  # noqa: E402
from fedmd_ray.config import from_dict  # noqa: E402
from fedmd_ray.results import seconds_per_round  # noqa: E402

TINY = ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2", "cnn3:8,8,16,0.1"]


def config(participants: int, subset: int, placement: str | None = None, rounds: int = 2) -> dict:
    return {
        "name": "scaling",
        "models": TINY,
        "participants": participants,
        "data": {
            "public": "synthetic",
            "public_classes": list(range(10)),
            "private": "synthetic",
            "private_classes": list(range(10, 16)),
            "synthetic_train_per_class": max(300, subset // 10 + 1),
            "synthetic_test_per_class": 30,
        },
        "partition": {"kind": "per_class", "samples_per_class": 1 if participants > 40 else 3},
        "train": {
            "public_epochs": 1,
            "private_epochs": 5,
            "rounds": rounds,
            "public_subset_size": subset,
            "revisit_epochs": 1,
            "upper_bound": False,
            "digest_batch_size": 128,
        },
        "resources": {"backend": "ray", "placement": placement},
    }


def raylet_pids(nodes: list | None = None) -> set[int]:
    """The raylets of this script's Ray (every node of a Cluster, or the local ray.init)."""
    if nodes is None:
        import ray._private.worker as worker

        nodes = [worker._global_node]
    return {info.process.pid for node in nodes for info in node.all_processes.get("raylet", [])}


def actor_pss_mib(raylets: set[int] | None = None) -> float:
    """PSS of the worker processes (actors) started by `raylets` (default: this driver's)."""
    raylets = raylet_pids() if raylets is None else raylets
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent not in raylets:
                continue
            # Proportional set size: shared pages (torch's libraries, the mmapped object
            # store) are split among the processes that map them instead of counted in each.
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def local_ray() -> None:
    """This script's own Ray on 2 CPUs and loopback, never a cluster already running here."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )


def run_sampled(
    values: dict, raylets: set[int] | None = None, out: Path | None = None
) -> tuple[RunResult, float | None]:
    """Run `values` (writing into `out` when given, as a real run does), reading the actors'
    PSS at the end of every round: (result, peak MiB)."""
    memory: list[float] = []
    result = run(
        from_dict(values), out, progress=None, on_round=lambda r, _: memory.append(actor_pss_mib(raylets))
    )
    return result, max(memory) if memory else None


def save_rows(rows: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)
    print(f"\nwritten: {path}")


def measure(values: dict, raylets: set[int] | None = None) -> dict:
    start = time.perf_counter()
    result, pss = run_sampled(values, raylets)
    rows = result.metrics.to_pylist()
    rounds = values["train"]["rounds"]
    moved = sum(r["bytes_sent"] + r["bytes_received"] for r in rows if r["phase"] == "digest") / rounds
    return {
        "seconds_per_round": seconds_per_round(rows),
        "actor_pss_mib": pss,
        "mib_moved_per_round": moved / 2**20,
        "total_seconds": time.perf_counter() - start,
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
        m = measure(config(10, 1000, placement="SPREAD"), raylet_pids(cluster.list_all_nodes()))
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
        m = measure(config(n, 1000))
        rows.append({"sweep": "participants", "nodes": 1, "participants": n, "subset": 1000, **m})
        print(
            f"{n:12d}  {m['seconds_per_round']:7.2f}  {m['actor_pss_mib']:13.0f}  {m['mib_moved_per_round']:15.2f}",
            flush=True,
        )
    print("\npublic subset  s/round  actor PSS MiB  MiB moved/round")
    for subset in [int(x) for x in args.subsets.split(",") if x]:
        m = measure(config(10, subset))
        rows.append({"sweep": "subset", "nodes": 1, "participants": 10, "subset": subset, **m})
        print(
            f"{subset:13d}  {m['seconds_per_round']:7.2f}  {m['actor_pss_mib']:13.0f}  "
            f"{m['mib_moved_per_round']:15.2f}",
            flush=True,
        )
    ray.shutdown()
    save_rows(rows, out / "scaling.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
