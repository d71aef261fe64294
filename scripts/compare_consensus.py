"""Compare consensus, digest and sharing variants of FedMD side by side.

Every variant runs on the same data, partitions and seed (one task built once), so the
differences are the variant's own. Writes comparison.parquet, comparison.md and
comparison.png into --out.

    python scripts/compare_consensus.py                       # synthetic, 10 participants
    python scripts/compare_consensus.py --data-dir ~/data     # MNIST -> EMNIST letters, reduced
    python scripts/compare_consensus.py --only mean,median,adv-mean,adv-median
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray import run
from fedmd_ray.benchmarking import at_least_one
from fedmd_ray.checks import from_dict
from fedmd_ray.config import merge, parse_overrides
from fedmd_ray.errors import FedMDError
from fedmd_ray.presets import get_preset
from fedmd_ray.tasks import build_task

ADVERSARIES = [3, 7]  # 2 of 10
VARIANTS: dict[str, dict] = {
    # Control: the same rounds with no consensus at all, only the private revisits. What a
    # variant gains beyond this row is what its consensus contributed.
    "no-consensus": {"train": {"digest_epochs": 0}},
    "mean": {},
    "weighted": {"train": {"consensus": "weighted"}},
    "confidence": {"train": {"consensus": "confidence"}},
    "median": {"train": {"consensus": "median"}},
    "trimmed_mean": {"train": {"consensus": "trimmed_mean"}},
    "era+kl": {"train": {"consensus": "era", "digest_loss": "kl"}},
    "loss-mse": {"train": {"digest_loss": "mse"}},
    "loss-kl-T2": {"train": {"digest_loss": "kl", "temperature": 2.0}},
    "float16": {"sharing": {"payload": "float16"}},
    "top3": {"sharing": {"payload": "topk", "topk": 3}},
    "dp-clip5-noise1": {"sharing": {"clip": 5.0, "noise_multiplier": 1.0}},
    "dp-clip5-noise4": {"sharing": {"clip": 5.0, "noise_multiplier": 4.0}},
    # Where DP-FedMD helps at all: the consensus of 10 participants on 1000 samples carries
    # noise of std 2*clip*sqrt(1000)*z/sqrt(10) = 100*z per entry against clipped scores of
    # ~1 per entry, so z must be ~0.01 or below, at an epsilon in the thousands.
    "dp-clip5-noise0.01": {"sharing": {"clip": 5.0, "noise_multiplier": 0.01}},
    "dp-clip5-noise0.001": {"sharing": {"clip": 5.0, "noise_multiplier": 0.001}},
    "adv-mean": {"sharing": {"adversaries": ADVERSARIES, "attack": "scaled"}},
    "adv-median": {
        "sharing": {"adversaries": ADVERSARIES, "attack": "scaled"},
        "train": {"consensus": "median"},
    },
    "adv-trimmed": {
        "sharing": {"adversaries": ADVERSARIES, "attack": "scaled"},
        "train": {"consensus": "trimmed_mean"},
    },
}


def base_config(data_dir: str | None, backend: str, rounds: int, participants: int = 10) -> dict:
    if data_dir:
        values = get_preset("mnist-femnist")
        values = merge(
            values,
            {
                "data": {"data_dir": data_dir, "public_train_size": 6000, "test_size": 1200},
                "models": ["cnn2:32,64,0.2", "cnn3:32,64,64,0.2", "cnn2:64,64,0.3", "cnn3:32,32,64,0.2"],
                "participants": participants,
                "train": {
                    "public_epochs": 1,
                    "public_subset_size": 1000,
                    "digest_batch_size": 64,
                    "revisit_epochs": 2,
                },
            },
        )
    else:
        values = merge(
            get_preset("smoke"),
            {"participants": participants, "train": {"public_subset_size": 1000, "digest_batch_size": 64}},
        )
    values["models"] = values["models"][:participants]  # in turn, when there are more participants
    return merge(
        values,
        {
            "name": "compare",
            "train": {"rounds": rounds, "upper_bound": False},
            "resources": {"backend": backend},
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="MNIST and EMNIST in torchvision's layout; synthetic without it")
    parser.add_argument("--out", default="runs/compare", help="where the table and plot go")
    parser.add_argument("--rounds", type=at_least_one, default=5)
    parser.add_argument("--participants", type=at_least_one, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="on every variant")
    parser.add_argument("--backend", default="ray", choices=["ray", "local"])
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument(
        "--consensus",
        action="append",
        default=[],
        metavar="SPEC",
        help="a consensus of your own to compare, e.g. my_consensus.py:sharp?power=2 (repeatable)",
    )
    args = parser.parse_args(argv)

    variants = dict(VARIANTS)
    for spec in args.consensus:
        variants[spec] = {"train": {"consensus": spec}}
    names = args.only.split(",") if args.only else list(VARIANTS)
    names += [s for s in args.consensus if s not in names]
    unknown = [n for n in names if n not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(variants)}")
    adversarial = [n for n in names if "adversaries" in variants[n].get("sharing", {})]
    if adversarial and args.participants <= max(ADVERSARIES):
        parser.error(
            f"the variants {', '.join(adversarial)} make participants {ADVERSARIES} adversaries, "
            f"and there are {args.participants}: give --participants {max(ADVERSARIES) + 1} or more, "
            "or choose variants with --only"
        )
    try:
        base = merge(
            base_config(args.data_dir, args.backend, args.rounds, args.participants),
            parse_overrides(args.set),
        )
        # Every variant checked before the first runs: a mistyped --consensus is said at
        # once, not after the variants before it have trained for minutes.
        configs = {name: from_dict(merge(base, variants[name])) for name in names}
        task = build_task(from_dict(base))  # one task: the same partitions for every variant
    except FedMDError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    failed = None
    for name in names:
        config = configs[name]
        start = time.perf_counter()
        folder = "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in name)
        try:
            result = run(config, out / folder, progress=None, task=task)
        except FedMDError as exc:
            print(f"error: variant {name}: {exc}", file=sys.stderr)
            failed = name
            break
        honest = [r for r in result.summary if not r.adversary]
        eps = [r["epsilon"] for r in result.metrics.to_pylist() if r["epsilon"] is not None]
        rows.append(
            {
                "variant": name,
                "final_accuracy": float(np.mean([r.fedmd_final for r in honest])),
                "lower_bound": float(np.mean([r.lower_bound for r in honest])),
                "gain": float(np.mean([r.gain for r in honest])),
                "kib_per_round": float(np.mean([r.bytes_per_round for r in result.summary])) / 1024,
                "fedavg_kib_per_round": float(np.mean([r.fedavg_bytes_per_round for r in result.summary]))
                / 1024,
                "epsilon": eps[-1] if eps else None,
                "seconds": time.perf_counter() - start,
            }
        )
        r = rows[-1]
        print(
            f"{name:18s} final {100 * r['final_accuracy']:5.1f}%  gain {100 * r['gain']:+5.1f}  "
            f"{r['kib_per_round']:7.1f} KiB/round  eps {r['epsilon'] if r['epsilon'] is not None else '-'}"
            f"  [{r['seconds']:.0f}s]",
            flush=True,
        )

    if not rows:
        return 1
    pq.write_table(pa.Table.from_pylist(rows), out / "comparison.parquet")
    data = "MNIST -> EMNIST letters (reduced)" if args.data_dir else "synthetic"
    lines = [
        f"# Consensus variants ({data}, {base['participants']} participants, {args.rounds} rounds, "
        f"seed {base.get('seed', 0)})",
        "",
        "Accuracy is the mean over honest participants; adversaries (participants "
        f"{ADVERSARIES}, scaled scores) only in the adv-* rows.",
        "",
        "| variant | final acc % | lower bound % | gain pts | KiB/round | FedAvg KiB/round | epsilon (delta 1e-5) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eps = "–" if r["epsilon"] is None else ("∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}")
        lines.append(
            f"| {r['variant']} | {100 * r['final_accuracy']:.1f} | {100 * r['lower_bound']:.1f} | "
            f"{100 * r['gain']:+.1f} | {r['kib_per_round']:.1f} | {r['fedavg_kib_per_round']:.1f} | {eps} |"
        )
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "comparison.png", data)
    print("\n".join(lines))
    print(f"\nwritten: {out}/comparison.md, comparison.parquet, comparison.png")
    if failed:
        print(
            f"stopped at variant {failed}: the table holds the {len(rows)} variants before it",
            file=sys.stderr,
        )
        return 1
    return 0


def plot(rows: list[dict], path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    y = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(
        1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True, constrained_layout=True
    )
    colors = [
        "tab:red" if n.startswith("adv") else "tab:purple" if n.startswith("dp") else "tab:blue"
        for n in names
    ]
    a1.barh(y, [100 * r["gain"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        a1.text(0, i, f" {100 * r['final_accuracy']:.1f}%", va="center", fontsize=8)
    a1.axvline(0, color="black", lw=0.8)
    a1.set(
        yticks=y,
        yticklabels=names,
        xlabel="gain over lower bound (points); label: final accuracy",
        title=f"FedMD variants, {data}",
    )
    a1.invert_yaxis()
    a2.barh(y, [r["kib_per_round"] for r in rows], color=colors)
    a2.axvline(rows[0]["fedavg_kib_per_round"], color="grey", ls="--", label="FedAvg (same models)")
    for i, r in enumerate(rows):
        if r["epsilon"] is not None:
            a2.text(r["kib_per_round"], i, f"  ε={r['epsilon']:.1f}", va="center", fontsize=8)
    a2.set(xscale="log", xlabel="KiB moved per participant per round (log)")
    a2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
