"""One experiment over several seeds: mean and standard deviation per participant and
overall, and the figure with shaded bands. A single-seed table is not a result.

Each seed changes everything random in a run: the private partition, the models'
initialisation and the public subsets drawn each round (all derive from `config.seed`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedmd_ray.report import SummaryRow, accuracy_curves, integer_rounds

KEYS = ("lower_bound", "fedmd_final", "fedmd_last3", "fedmd_best", "upper_bound", "gain")


def from_folder(path: str | Path, seed: int) -> dict:
    """One seed's run as `aggregate` takes it, read back from its results folder."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    summary = [
        SummaryRow.from_dict(r) for r in json.loads((path / "summary.json").read_text())["participants"]
    ]
    return {
        "seed": seed,
        "summary": summary,
        "curves": accuracy_curves(pq.read_table(path / "metrics.parquet"), summary),
    }


def _ms(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict:
    """`runs`: one {"seed", "summary", "curves"} per seed -> per participant and overall
    mean and standard deviation across seeds, and the paper's checks per seed."""
    names = [r.participant for r in runs[0]["summary"]]
    per_participant = []
    for i, name in enumerate(names):
        row = {"participant": name, "model": runs[0]["summary"][i].model}
        for key in KEYS:
            row[key] = _ms([getattr(run["summary"][i], key) for run in runs])
        per_participant.append(row)
    overall: dict[str, tuple[float, float]] = {}
    for key in KEYS:
        overall[key] = _ms([float(np.mean([getattr(r, key) for r in run["summary"]])) for run in runs])
    overall["gap_to_upper_last3"] = _ms(
        [float(np.mean([r.upper_bound - r.fedmd_last3 for r in run["summary"]])) for run in runs]
    )
    checks = []
    for run in runs:
        mean_curve = mean_by_round(run["curves"])
        # From the lower bound (round 0) on: a first round below it counts as a drop too.
        drops = [mean_curve[r - 1] - mean_curve[r] for r in sorted(mean_curve) if r - 1 in mean_curve]
        checks.append(
            {
                "seed": run["seed"],
                "below_lower_bound": [
                    r.participant for r in run["summary"] if r.fedmd_last3 <= r.lower_bound
                ],
                "largest_drop": max([0.0, *drops]),
                "gap_to_upper": float(np.mean([r.upper_bound - r.fedmd_last3 for r in run["summary"]])),
            }
        )
    return {
        "seeds": [run["seed"] for run in runs],
        "participants": per_participant,
        "overall": overall,
        "checks": checks,
    }


def mean_by_round(curves_: dict[str, dict[int, float]]) -> dict[int, float]:
    rounds = sorted(set().union(*(c.keys() for c in curves_.values())))
    return {r: float(np.mean([c[r] for c in curves_.values() if r in c])) for r in rounds}


def render(agg: dict, title: str) -> str:
    def pm(pair: tuple[float, float], signed: bool = False) -> str:
        m, s = pair
        if math.isnan(m):
            return "–"
        return (f"{100 * m:+.1f}" if signed else f"{100 * m:.1f}") + f" ± {100 * s:.1f}"

    seeds = agg["seeds"]
    lines = [
        f"# {title}: {len(seeds)} seeds ({', '.join(str(s) for s in seeds)})",
        "",
        "Test accuracy (%), mean ± standard deviation across seeds. FedMD last 3: the mean of the "
        "last three rounds; gain: final minus lower bound.",
        "",
        "| participant | model | lower bound | FedMD final | FedMD last 3 | FedMD best | upper bound | gain |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in agg["participants"]:
        lines.append(
            f"| {r['participant']} | `{r['model']}` | {pm(r['lower_bound'])} | {pm(r['fedmd_final'])} | "
            f"{pm(r['fedmd_last3'])} | {pm(r['fedmd_best'])} | {pm(r['upper_bound'])} | {pm(r['gain'], True)} |"
        )
    o = agg["overall"]
    lines.append(
        f"| **mean** | | {pm(o['lower_bound'])} | {pm(o['fedmd_final'])} | {pm(o['fedmd_last3'])} | "
        f"{pm(o['fedmd_best'])} | {pm(o['upper_bound'])} | **{pm(o['gain'], True)}** |"
    )
    lines += [
        "",
        f"Mean gain over the lower bound: **{pm(o['gain'], True)} points**; mean gap to the upper bound "
        f"(upper bound − last three rounds): **{pm(o['gap_to_upper_last3'])} points**.",
        "",
        "| seed | participants at or below their lower bound (last 3 rounds) | largest round-to-round drop of the mean | gap to upper bound |",
        "|---:|---|---:|---:|",
    ]
    for c in agg["checks"]:
        below = ", ".join(c["below_lower_bound"]) or "none"
        lines.append(
            f"| {c['seed']} | {below} | {100 * c['largest_drop']:.1f} pts | {100 * c['gap_to_upper']:.1f} pts |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], agg: dict, path: Path, title: str) -> None:
    """Each participant's mean curve across seeds with a ±1 std band, the overall mean in
    black, and the mean upper bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["participant"] for r in agg["participants"]]
    rounds = sorted(set().union(*(c.keys() for run in runs for c in run["curves"].values())))
    fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        values = np.array([[run["curves"][name].get(r, np.nan) for r in rounds] for run in runs])
        m, s = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        color = colors(i % colors.N)
        ax.plot(rounds, 100 * m, "-", color=color, lw=1.2, label=name)
        ax.fill_between(rounds, 100 * (m - s), 100 * (m + s), color=color, alpha=0.12, lw=0)
    means = np.array([[mean_by_round(run["curves"]).get(r, np.nan) for r in rounds] for run in runs])
    m, s = np.nanmean(means, axis=0), np.nanstd(means, axis=0)
    ax.plot(rounds, 100 * m, "-o", color="black", lw=2.2, ms=3.5, label="mean")
    ax.fill_between(rounds, 100 * (m - s), 100 * (m + s), color="black", alpha=0.15, lw=0)
    upper, upper_std = agg["overall"]["upper_bound"]
    if not math.isnan(upper):
        ax.axhline(100 * upper, color="black", ls="--", lw=1.2, label="mean upper bound")
        ax.axhspan(100 * (upper - upper_std), 100 * (upper + upper_std), color="black", alpha=0.06)
    ax.set(
        xlabel="round (0 = after transfer learning: the lower bound)",
        ylabel="test accuracy (%)",
        title=f"{title}: mean ± std over {len(runs)} seeds",
    )
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
