"""The same FedMD work on the `local` (sequential) and `ray` backends, side by side.

Same models, data, partitions, epochs and seed for both; one invocation, so both see the
same machine state. Prints, per phase: seconds on each backend, the ray/local ratio, Ray's
overhead (phase wall time beyond what the participants' own compute needs at the
concurrency the backend allows), samples
per second, and on CUDA the GPU utilisation. Writes bench.parquet and bench.json to --out.

    python scripts/bench.py                                   # CPU, 10 small CNNs, ~2 minutes here
    python scripts/bench.py --models small,mixed,paper --repeat 3   # one table of medians
    python scripts/bench.py --models paper --device cuda --gpu-fraction 0.1 --public-subset 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray import run
from fedmd_ray.config import from_dict
from fedmd_ray.presets import PAPER_MODELS, PRESETS
from fedmd_ray.results import phase_walls, seconds_per_round
from fedmd_ray.tasks import build_task

MIXES = {
    "small": PRESETS["smoke"]["models"],
    "paper": PAPER_MODELS,
    "mixed": [
        *PAPER_MODELS[:6],
        "resnet18",
        "mobilenet_v3_small",
        "shufflenet_v2_x0_5",
        "cnn3:64,128,192,0.2",
    ],
}
PHASES = ("transfer", "communicate", "aggregate", "digest", "revisit", "evaluate", "checkpoint")
ROUND_PHASES = PHASES[1:]


class GpuSampler:
    """GPU utilisation and per-process GPU memory from nvidia-smi, sampled every 200 ms.

    Each Ray actor is its own process, so the per-process peaks are the GPU memory per actor
    (CUDA context included), and their count is how many participants shared the GPU."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.process_peak_mib: dict[int, float] = {}
        self.peak_used_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _query(*args: str) -> str:
        return subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5
        ).stdout

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                util, used = self._query("--query-gpu=utilization.gpu,memory.used").splitlines()[0].split(",")
                self.samples.append(float(util))
                self.peak_used_mib = max(self.peak_used_mib, float(used))
                for line in self._query("--query-compute-apps=pid,used_memory").splitlines():
                    pid, mib = (float(v) for v in line.split(","))
                    self.process_peak_mib[int(pid)] = max(self.process_peak_mib.get(int(pid), 0.0), mib)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    def report(self) -> dict:
        peaks = sorted(self.process_peak_mib.values())
        return {
            "gpu_utilisation": self.mean,
            "gpu_processes": len(peaks),
            "gpu_mib_per_process_median": float(np.median(peaks)) if peaks else None,
            "gpu_mib_per_process_max": max(peaks) if peaks else None,
            "gpu_mib_used_peak": self.peak_used_mib,
        }


def make_config(args: argparse.Namespace, backend: str) -> dict:
    return {
        "name": f"bench-{backend}",
        "seed": 0,
        "checkpoint_every": 0,  # no state files: the work measured is FedMD's
        "models": MIXES[args.models],
        "participants": args.participants,
        "data": {
            "public": args.dataset,
            "public_classes": list(range(10)),
            "private": args.dataset,
            "private_classes": list(range(10, 16)),
            "synthetic_image_size": args.image_size,
            "synthetic_train_per_class": args.public_train // 10,
            "data_dir": args.data_dir,
        },
        "partition": {"kind": "per_class", "samples_per_class": 3},
        "train": {
            "public_epochs": 1,
            "private_epochs": 5,
            "rounds": args.rounds,
            "public_subset_size": args.public_subset,
            "upper_bound": False,
        },
        "sharing": {"payload": args.payload},
        "resources": {
            "backend": backend,
            "device": args.device,
            "num_gpus": args.gpu_fraction if (backend == "ray" and args.device == "cuda") else 0.0,
            "torch_threads": None,
            "actors": args.actors if backend == "ray" else None,
        },
    }


def phase_table(metrics: list[dict], task, config, concurrency: int) -> dict[str, dict]:
    """Per phase: wall seconds (summed over rounds), participant compute, the ideal time that
    compute needs at the allowed `concurrency` (max of the slowest participant and the total
    spread over that many workers), and samples processed. Overhead = wall - ideal."""
    t = config.train
    n = config.num_participants
    private = sum(len(p) for p in task.private_parts)
    samples = {
        "transfer": n * len(task.public_train) * t.public_epochs + private * t.private_epochs,
        "communicate": n * t.public_subset_size * t.rounds,
        "aggregate": n * t.public_subset_size * t.rounds,
        "digest": n * t.public_subset_size * t.digest_epochs * t.rounds,
        "revisit": private * t.revisit_epochs * t.rounds,
        "evaluate": n * len(task.private_test) * t.rounds,
        "checkpoint": 0,  # the ray backend's per-round state snapshot, for actor restarts
    }
    out = {}
    walls = phase_walls(metrics)
    for phase in PHASES:
        by_round: dict[int, list[float]] = {}
        for r in metrics:
            if r["phase"] == phase and r["participant"] != "*" and r["seconds"] is not None:
                by_round.setdefault(r["round"], []).append(r["seconds"])
        wall = float(sum(s for (_, ph), s in walls.items() if ph == phase))
        ideal = float(sum(max(max(v), sum(v) / concurrency) for v in by_round.values())) if by_round else 0.0
        total = float(sum(sum(v) for v in by_round.values())) if by_round else 0.0
        out[phase] = {
            "wall_seconds": wall,
            "ideal_compute": ideal,
            "total_compute": total,
            "overhead_seconds": wall - ideal if by_round else None,
            "samples": samples[phase],
            "samples_per_second": samples[phase] / wall if wall else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=10)
    p.add_argument("--models", default="small", help=f"one or more of {', '.join(MIXES)}, comma-separated")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each backend per model set (medians reported)"
    )
    p.add_argument("--public-subset", type=int, default=1000)
    p.add_argument("--public-train", type=int, default=2000, help="public training images (synthetic)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--gpu-fraction", type=float, default=0.1)
    p.add_argument("--payload", choices=["float32", "float16", "topk"], default="float32")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--backends", default="local,ray")
    p.add_argument("--actors", type=int, help="ray: a pool of this many actors serving the participants")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    mixes = args.models.split(",")
    for m in mixes:
        if m not in MIXES:
            p.error(f"--models: unknown set '{m}' (choose from {', '.join(MIXES)})")
    if len(mixes) > 1 or args.repeat > 1:
        return _medians(args, mixes)
    return _one(args)


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
        f"{'models':8s} {'local s/round':>13s} {'ray s/round':>11s} {'ray/local':>9s} {'local run s':>11s} {'ray run s':>9s} {'run ray/local':>13s}"
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
        config = from_dict(make_config(args, backend))
        start = time.perf_counter()
        with GpuSampler() if args.device == "cuda" else _null() as gpu:
            result = run(config, out / backend, progress=None, task=task)
        metrics = result.metrics.to_pylist()
        phases = phase_table(metrics, task, config, _concurrency(config))
        round_seconds = seconds_per_round(metrics)
        # Aggregation is all overhead: no participant computes during it.
        overhead = (
            sum(phases[ph]["overhead_seconds"] or phases[ph]["wall_seconds"] for ph in ROUND_PHASES)
            / config.train.rounds
        )
        results[backend] = {
            "phases": phases,
            "seconds_per_round": round_seconds,
            "rounds_per_hour": 3600 / round_seconds,
            "overhead_seconds_per_round": overhead if backend == "ray" else None,
            "overhead_fraction": overhead / round_seconds if backend == "ray" else None,
            **(gpu.report() if isinstance(gpu, GpuSampler) else {"gpu_utilisation": None}),
            "total_seconds": time.perf_counter() - start,
            "mean_final_accuracy": float(np.mean([r["fedmd_final"] for r in result.summary])),
        }
        print(
            f"{backend}: {round_seconds:.2f} s/round, total {results[backend]['total_seconds']:.0f} s",
            flush=True,
        )

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


def _concurrency(config) -> int:
    """How many participants the backend lets compute at once (the ray backend's window)."""
    if config.resources.backend == "local":
        return 1
    import ray

    from fedmd_ray.backends import concurrency_window, plan_resources

    _, _, threads = plan_resources(config, ray.cluster_resources())
    return concurrency_window(config, ray.cluster_resources(), threads) or config.num_participants


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None


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
    for ph in PHASES:
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
            f"{100 * ray['overhead_fraction']:.1f}% of the round"
        )
        if ray["gpu_utilisation"] is not None:
            print(f"GPU utilisation during the ray run: {ray['gpu_utilisation']:.0f}%")
    for name, r in results.items():
        if r.get("gpu_processes"):
            print(
                f"{name}: {r['gpu_utilisation']:.0f}% GPU busy, {r['gpu_processes']} processes on the GPU, "
                f"memory per process median {r['gpu_mib_per_process_median']:.0f} MiB "
                f"(max {r['gpu_mib_per_process_max']:.0f}), GPU memory used at peak {r['gpu_mib_used_peak']:.0f} MiB"
            )


if __name__ == "__main__":
    raise SystemExit(main())
