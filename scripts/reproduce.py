"""Reproduce one of the FedMD paper's experiments: lower bound, FedMD, upper bound, with the
paper-style figure and the per-model table, and a report of how it was run.

    python scripts/reproduce.py mnist-femnist --data-dir ~/data                # full scale
    python scripts/reproduce.py mnist-femnist --data-dir ~/data --scale 0.1    # a laptop's worth
    python scripts/reproduce.py cifar10-cifar100-superclass --data-dir ~/data --set resources.num_gpus=0.1
    python scripts/reproduce.py fashion                                         # real data, offline
    python scripts/reproduce.py fashion-paper --seeds 3                         # the paper's regime, error bars

Writes into --out: everything `fedmd-ray run` writes, figure.png (the paper's figure) and
reproduction.md (command, data, device, wall time, table, and the paper's claim beside it).
With --seeds N: one run per seed in seed-S/, and seeds.md / seeds.json / figure.png with
mean ± standard deviation across seeds (shaded bands).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fedmd_ray.benchmarking import at_least_one
from fedmd_ray.cli import resolve_config
from fedmd_ray.data import location
from fedmd_ray.errors import FedMDError
from fedmd_ray.fedmd import run
from fedmd_ray.presets import PRESETS
from fedmd_ray.report import accuracy_curves, plot_accuracy, render_summary

PAPER_CLAIM = (
    "FedMD paper (Li & Wang, 2019), both experiments: each of the 10 models gains about 20 "
    "points of test accuracy over its lower bound (training alone) and ends a few points "
    "below its upper bound (all private data pooled)."
)


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPUs"
    return f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(PRESETS))
    p.add_argument("--data-dir", help="datasets in torchvision's layouts (or FEDMD_DATA_DIR)")
    p.add_argument("--scale", type=float, help="shrink public data, public epochs and rounds, e.g. 0.1")
    p.add_argument("--backend", choices=["ray", "local"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="default runs/reproduce-EXPERIMENT[-scaleS]")
    p.add_argument(
        "--seeds", type=at_least_one, default=1, help="run with this many seeds (seed, seed+1, ...)"
    )
    args = p.parse_args(argv)

    try:
        config = resolve_config(
            args.experiment, None, args.set, args.data_dir, backend=args.backend, scale_factor=args.scale
        )
    except FedMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = f"-scale{args.scale:g}" if args.scale else ""
    out = Path(args.out or f"runs/reproduce-{args.experiment}{suffix}")
    if args.seeds > 1:
        return _several_seeds(args, argv, config, out)
    start = time.perf_counter()
    try:
        result = run(config, out, progress=lambda m: print(m, flush=True))
    except FedMDError as exc:
        print(f"error: {exc}{_left(out)}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start

    plot_accuracy(result.metrics, result.summary, out / "figure.png", config.name, panels=False)
    gains = [r.gain for r in result.summary]
    below_upper = [r.upper_bound - r.fedmd_final for r in result.summary]
    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = [
        f"# Reproduction: `{args.experiment}`"
        + (f" at scale {args.scale:g}" if args.scale else " (full scale)"),
        "",
        f"- command: `{command}`",
        f"- data: public `{config.data.public}` ({config.data.public_train_size or 'all'} training images), "
        f"private `{config.data.private}` classes {config.data.private_classes}, partition "
        f"`{config.partition.kind}`; read from `{location(config.data.public, config.data.data_dir)}`"
        + (
            ""
            if config.data.private == config.data.public
            else f" and `{location(config.data.private, config.data.data_dir)}`"
        ),
        f"- device: {device_description()}; backend `{config.resources.backend}`",
        f"- wall time: {seconds / 60:.1f} min",
        "",
        "![figure](figure.png)",
        "",
        render_summary(result.summary, config).split("\n", 2)[2],
        f"Every participant above its lower bound: **{all(g > 0 for g in gains)}**; mean gain "
        f"**{100 * np.mean(gains):+.1f} points**; final accuracy {100 * np.mean(below_upper):.1f} points "
        "below the upper bound on average.",
        "",
        f"Paper: {PAPER_CLAIM}",
    ]
    (out / "reproduction.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


def _left(run_dir: Path) -> str:
    """What a stopped run left, as a line of its own ('' when it wrote nothing)."""
    if (run_dir / "metrics.parquet").exists():
        return f"\nResults written so far are in {run_dir}/"
    if (run_dir / "config.json").exists():
        return f"\nNo results yet (its config and partition are in {run_dir}/)."
    return ""


def _several_seeds(args: argparse.Namespace, argv: list[str] | None, config, out: Path) -> int:
    import dataclasses
    import json

    from fedmd_ray import seeds as seeds_lib

    runs, start = [], time.perf_counter()
    for k in range(args.seeds):
        seed = config.seed + k
        print(f"=== seed {seed} ({k + 1}/{args.seeds}) ===", flush=True)
        seeded = dataclasses.replace(config, seed=seed)
        try:
            result = run(seeded, out / f"seed-{seed}", progress=lambda m: print(m, flush=True))
        except FedMDError as exc:
            earlier = f"\nThe earlier seeds' results are in {out}/" if runs else ""
            print(f"error (seed {seed}): {exc}{_left(out / f'seed-{seed}') or earlier}", file=sys.stderr)
            return 1
        runs.append(
            {
                "seed": seed,
                "summary": result.summary,
                "curves": accuracy_curves(result.metrics, result.summary),
            }
        )
    minutes = (time.perf_counter() - start) / 60
    agg = seeds_lib.aggregate(runs)
    seeds_lib.plot(runs, agg, out / "figure.png", config.name)
    (out / "seeds.json").write_text(json.dumps(agg, indent=2) + "\n")
    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = (
        seeds_lib.render(agg, config.name)
        + f"\n![figure](figure.png)\n\n- command: `{command}`\n- device: {device_description()}; backend "
        f"`{config.resources.backend}`\n- wall time: {minutes:.1f} min for {args.seeds} seeds\n\nPaper: {PAPER_CLAIM}\n"
    )
    (out / "seeds.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
