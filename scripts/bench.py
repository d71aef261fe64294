"""The same FedMD work on the `local` (sequential) and `ray` backends, side by side.

Same models, data, partitions, epochs, seed and torch threads for both (they compute the
same numbers); one invocation, so both see the same machine state. Prints, per phase:
seconds on each backend, the ray/local ratio, Ray's overhead (phase wall time beyond what
the participants' own compute needs at the concurrency the run used), samples per second,
and on CUDA the GPU's use. Writes bench.parquet and bench.json to --out.

    python scripts/bench.py                                         # CPU, 10 small CNNs, ~2 minutes here
    python scripts/bench.py --models small,mixed,paper --repeat 3   # one table of medians
    python scripts/bench.py --models paper --device cuda --gpu-fraction 0.1 --public-subset 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray.benchmarking import MODEL_SETS, Measured, at_least_one, measure, share, synthetic_config
from fedmd_ray.checks import from_dict
from fedmd_ray.config import BACKENDS
from fedmd_ray.errors import FedMDError
from fedmd_ray.phases import ROUND_PHASES, Phase
from fedmd_ray.results import phase_walls
from fedmd_ray.tasks import build_task

ROUND_PHASES = (*ROUND_PHASES, Phase.CHECKPOINT)
PHASES = (Phase.TRANSFER, *ROUND_PHASES)


def make_config(args: argparse.Namespace, backend: str) -> dict:
    on_gpu = backend == "ray" and args.device == "cuda"
    return synthetic_config(
        args.models,
        args.participants,
        rounds=args.rounds,
        image_size=args.image_size,
        public_train=args.public_train,
        public_subset=args.public_subset,
        name=f"bench-{backend}",
        data={"data_dir": args.data_dir} if args.data_dir else {},
        train={"revisit_epochs": 4},
        sharing={"payload": args.payload},
        resources={
            "backend": backend,
            "device": args.device,
            "num_gpus": args.gpu_fraction if on_gpu else 0.0,
            "torch_threads": args.threads,
            "actors": args.actors if backend == "ray" else None,
            "group": args.group and backend == "ray",
            "mps": "auto" if args.mps and backend == "ray" else "off",
        },
    )


def phase_table(m: Measured, task) -> dict[str, dict]:
    """Per phase: wall seconds (summed over rounds), participant compute, the ideal time that
    compute needs at the run's concurrency (max of the slowest participant and the total
    spread over that many workers), and samples processed. Overhead = wall - ideal."""
    config, metrics = m.config, m.result.metrics.to_pylist()
    t, n = config.train, config.num_participants
    private = sum(len(p) for p in task.private_parts)
    samples = {
        Phase.TRANSFER: n * len(task.public_train) * t.public_epochs + private * t.private_epochs,
        Phase.COMMUNICATE: n * t.public_subset_size * t.rounds,
        Phase.AGGREGATE: n * t.public_subset_size * t.rounds,
        Phase.DIGEST: n * t.public_subset_size * t.digest_epochs * t.rounds,
        Phase.REVISIT: private * t.revisit_epochs * t.rounds,
        Phase.EVALUATE: n * len(task.private_test) * t.rounds,
        Phase.CHECKPOINT: 0,  # the ray backend's per-round state snapshot, for actor restarts
    }
    out = {}
    walls = phase_walls(metrics)
    for phase in PHASES:
        by_round: dict[int, list[float]] = {}
        for r in metrics:
            if r["phase"] == phase and r["participant"] != "*" and r["seconds"] is not None:
                by_round.setdefault(r["round"], []).append(r["seconds"])
        wall = float(sum(s for (_, ph), s in walls.items() if ph == phase))
        ideal = sum(max(max(v), sum(v) / m.window) for v in by_round.values()) if by_round else 0.0
        out[str(phase)] = {
            "wall_seconds": wall,
            "ideal_compute": float(ideal),
            "total_compute": float(sum(sum(v) for v in by_round.values())),
            "overhead_seconds": wall - ideal if by_round else None,
            "samples": samples[phase],
            "samples_per_second": samples[phase] / wall if wall else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=at_least_one, default=10)
    p.add_argument(
        "--models", default="small", help=f"one or more of {', '.join(MODEL_SETS)}, comma-separated"
    )
    p.add_argument(
        "--repeat", type=at_least_one, default=1, help="runs of each backend per model set (medians reported)"
    )
    p.add_argument("--public-subset", type=at_least_one, default=1000)
    p.add_argument(
        "--public-train", type=at_least_one, default=2000, help="public training images (synthetic)"
    )
    p.add_argument("--image-size", type=at_least_one, default=28)
    p.add_argument("--rounds", type=at_least_one, default=3)
    p.add_argument("--threads", type=at_least_one, help="resources.torch_threads (default: from the cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--gpu-fraction", type=share, default=0.1)
    p.add_argument("--payload", choices=["float32", "float16", "topk"], default="float32")
    p.add_argument("--data-dir")
    p.add_argument("--backends", default="local,ray")
    p.add_argument(
        "--actors", type=at_least_one, help="ray: a pool of this many actors serving the participants"
    )
    p.add_argument(
        "--group",
        action="store_true",
        help="ray pool: resources.group (one model's participants step as one)",
    )
    p.add_argument(
        "--mps",
        action="store_true",
        help="ray on GPUs: resources.mps=auto (NVIDIA MPS for actors sharing a GPU)",
    )
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    mixes = args.models.split(",")
    for m in mixes:
        if m not in MODEL_SETS:
            p.error(f"--models: unknown set '{m}' (choose from {', '.join(MODEL_SETS)})")
    unknown = [b for b in args.backends.split(",") if b not in BACKENDS]
    if unknown:
        p.error(f"--backends: unknown backend(s) {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    try:
        if len(mixes) > 1 or args.repeat > 1:
            return _medians(args, mixes)
        return _one(args)
    except FedMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _medians(args: argparse.Namespace, mixes: list[str]) -> int:
    """Each model set `repeat` times (local then ray, side by side each time); medians of
    seconds per round and whole-run seconds, and of the per-run ratios, in one table."""
    import ray

    table = []
    for mix in mixes:
        runs = []
        for k in range(args.repeat):
            sub = argparse.Namespace(**{**vars(args), "models": mix, "out": f"{args.out}/{mix}-{k}"})
            _one(sub, quiet=True)
            ray.shutdown()  # so that every ray run's whole-run time includes starting Ray
            runs.append(json.loads((Path(sub.out) / "bench.json").read_text())["results"])
        lr = [r["local"]["seconds_per_round"] for r in runs]
        rr = [r["ray"]["seconds_per_round"] for r in runs]
        lt = [r["local"]["total_seconds"] for r in runs]
        rt = [r["ray"]["total_seconds"] for r in runs]
        table.append(
            {
                "models": mix,
                "runs": args.repeat,
                "local_s_per_round": float(np.median(lr)),
                "ray_s_per_round": float(np.median(rr)),
                "round_throughput_ray_over_local": float(np.median([a / b for a, b in zip(lr, rr)])),
                "local_total_s": float(np.median(lt)),
                "ray_total_s": float(np.median(rt)),
                "whole_run_ray_over_local": float(np.median([a / b for a, b in zip(lt, rt)])),
                "per_run_round_ratios": [round(a / b, 3) for a, b in zip(lr, rr)],
            }
        )
        print(f"{mix}: ratios per run {table[-1]['per_run_round_ratios']}", flush=True)
    print(
        f"\n{args.participants} participants, public subset {args.public_subset}, {args.rounds} rounds, "
        f"device {args.device}, {os.cpu_count()} CPUs; medians of {args.repeat} runs\n"
    )
    print(
        f"{'models':8s} {'local s/round':>13s} {'ray s/round':>11s} {'ray/local':>9s} "
        f"{'local run s':>11s} {'ray run s':>9s} {'run ray/local':>13s}"
    )
    for t in table:
        print(
            f"{t['models']:8s} {t['local_s_per_round']:13.2f} {t['ray_s_per_round']:11.2f} "
            f"{t['round_throughput_ray_over_local']:8.2f}x {t['local_total_s']:11.1f} {t['ray_total_s']:9.1f} "
            f"{t['whole_run_ray_over_local']:12.2f}x"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "medians.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=2))
    print(f"\nwritten: {args.out}/medians.json (ray/local: throughput, above 1 = ray faster)")
    return 0


def _one(args: argparse.Namespace, quiet: bool = False) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = args.backends.split(",")
    task = build_task(from_dict(make_config(args, "local")))
    results: dict[str, dict] = {}
    for backend in backends:
        m = measure(make_config(args, backend), out / backend, task=task, gpu=args.device == "cuda")
        phases = phase_table(m, task)
        # Aggregation is all overhead: no participant computes during it.
        overhead = (
            sum(phases[ph]["overhead_seconds"] or phases[ph]["wall_seconds"] for ph in ROUND_PHASES)
            / m.config.train.rounds
        )
        on_ray = backend == "ray"
        results[backend] = {
            "phases": phases,
            "seconds_per_round": m.seconds_per_round,
            "round_seconds": m.round_seconds,
            "rounds_per_hour": 3600 / m.seconds_per_round,
            "window": m.window,
            "overhead_seconds_per_round": overhead if on_ray else None,
            "overhead_fraction": overhead / m.seconds_per_round if on_ray else None,
            "total_seconds": m.total_seconds,
            "mean_final_accuracy": m.mean_accuracy,
            **m.gpu,
        }
        print(f"{backend}: {m.seconds_per_round:.2f} s/round, total {m.total_seconds:.0f} s", flush=True)

    if not quiet:
        print_table(args, results)
    rows = [
        {"backend": b, "phase": ph, **vals} for b, r in results.items() for ph, vals in r["phases"].items()
    ]
    pq.write_table(pa.Table.from_pylist(rows), out / "bench.parquet")
    meta = {
        "args": vars(args),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "time": time.ctime(),
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"\nwritten: {out}/bench.parquet, bench.json")
    return 0


def print_table(args: argparse.Namespace, results: dict) -> None:
    local, ray = results.get("local"), results.get("ray")
    print(
        f"\n{args.participants} participants ({args.models}), public subset {args.public_subset}, "
        f"{args.rounds} rounds, device {args.device}"
        + (f", {args.gpu_fraction} GPU each" if args.device == "cuda" else "")
        + f", {os.cpu_count()} CPUs\n"
    )
    print(
        f"{'phase':12s} {'local s':>9s} {'ray s':>9s} {'ray/local':>9s} {'ray ovh s':>9s} "
        f"{'local smp/s':>11s} {'ray smp/s':>11s}"
    )
    for ph in map(str, PHASES):
        lw = local["phases"][ph]["wall_seconds"] if local else float("nan")
        rw = ray["phases"][ph]["wall_seconds"] if ray else float("nan")
        ovh = ray["phases"][ph]["overhead_seconds"] if ray else None
        ovh = rw if ray and ovh is None else (ovh if ovh is not None else float("nan"))
        ls = local["phases"][ph]["samples_per_second"] if local else None
        rs = ray["phases"][ph]["samples_per_second"] if ray else None
        print(
            f"{ph:12s} {lw:9.2f} {rw:9.2f} {rw / lw if lw else float('nan'):9.2f} {ovh:9.2f} "
            f"{ls or float('nan'):11.0f} {rs or float('nan'):11.0f}"
        )
    if local and ray:
        print(
            f"\nper round: local {local['seconds_per_round']:.2f} s, ray {ray['seconds_per_round']:.2f} s "
            f"-> ray round throughput {local['seconds_per_round'] / ray['seconds_per_round']:.2f}x local"
        )
    if ray:
        print(
            f"ray overhead: {ray['overhead_seconds_per_round']:.3f} s/round = "
            f"{100 * ray['overhead_fraction']:.1f}% of the round ({ray['window']} participants computing at once)"
        )
    for name, r in results.items():
        if r.get("gpu_processes"):
            print(
                f"{name}: {r['gpu_busy_percent']:.0f}% GPU busy, {r['gpu_processes']} processes on the GPU, "
                f"memory per process median {r['gpu_mib_per_process_median']:.0f} MiB "
                f"(max {r['gpu_mib_per_process_max']:.0f}), GPU memory used at peak {r['gpu_mib_used_peak']:.0f} MiB"
            )


if __name__ == "__main__":
    raise SystemExit(main())
