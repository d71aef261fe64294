"""Several runs side by side: one table of their summaries (with the settings in which they
differ) and one figure of their mean accuracy per round.

    fedmd-ray compare runs/a runs/b runs/c --out runs/compare
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fedmd_ray.config import flatten
from fedmd_ray.errors import ConfigError
from fedmd_ray.phases import Phase
from fedmd_ray.report import integer_rounds, is_result

COLUMNS = (
    ("lower_bound", "lower bound"),
    ("fedmd_final", "FedMD final"),
    ("fedmd_last3", "FedMD last 3"),
    ("fedmd_best", "FedMD best"),
    ("upper_bound", "upper bound"),
    ("gain", "gain"),
)


def load_run(path: Path) -> dict:
    """A run folder's summary, config and per-round mean accuracy."""
    summary_file, config_file = path / "summary.json", path / "config.json"
    if not summary_file.exists() or not config_file.exists():
        raise ConfigError(
            f"{path} is not a finished fedmd-ray run folder (it needs summary.json and config.json; "
            "a run writes them when it ends, or stops)."
        )
    summary = json.loads(summary_file.read_text())
    curve: dict[int, list[float]] = {}
    metrics = path / "metrics.parquet"
    if metrics.exists():
        columns = ["round", "participant", "phase", "accuracy", "note"]
        for r in pq.read_table(metrics, columns=columns).to_pylist():
            if is_result(r, Phase.EVALUATE):
                curve.setdefault(r["round"], []).append(r["accuracy"])
    return {
        "path": path,
        "summary": summary,
        "config": json.loads(config_file.read_text()),
        "curve": {k: float(np.mean(v)) for k, v in sorted(curve.items())},
    }


def differing(configs: list[dict]) -> list[str]:
    """The dotted config keys whose values are not the same in every run."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def table(runs: list[dict]) -> str:
    keys = [k for k in differing([r["config"] for r in runs]) if k not in ("name",)]

    def pct(x: float | None, signed: bool = False) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "–"
        return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"

    flat = [flatten(r["config"]) for r in runs]
    head = ["run", *keys, *(label for _, label in COLUMNS), "epsilon", "complete"]
    lines = [
        "Mean over each run's participants, test accuracy (%); columns before the accuracies "
        "are the settings in which the runs differ.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * (1 + len(keys)) + ["---:"] * (len(COLUMNS) + 1) + ["---"]) + "|",
    ]
    for run, f in zip(runs, flat):
        mean = run["summary"].get("mean", {})
        eps = run["summary"].get("epsilon")
        cells = [
            f"`{run['path']}`",
            *(f"`{json.dumps(f.get(k))}`" for k in keys),
            *(pct(mean.get(key), signed=key == "gain") for key, _ in COLUMNS),
            "–" if eps is None else f"{eps:.3g}",
            "yes" if run["summary"].get("complete") else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        color = colors(i % 10)
        mean = run["summary"].get("mean", {})
        rounds = [0, *run["curve"]]
        values = [mean.get("lower_bound", float("nan")), *run["curve"].values()]
        ax.plot(rounds, [100 * v for v in values], "o-", color=color, label=str(run["path"]), markersize=3)
        upper = mean.get("upper_bound")
        if upper is not None and not math.isnan(upper):
            ax.axhline(100 * upper, color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("round (0: after transfer learning)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("FedMD runs compared (dashed: each run's upper bound)")
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(paths: list[str], out: str | Path) -> str:
    """Write compare.md and compare.png into `out`; return the table."""
    if len(paths) < 2:
        raise ConfigError("fedmd-ray compare needs at least two run folders.")
    runs = [load_run(Path(p)) for p in paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "compare.md").write_text("# FedMD runs compared\n\n" + text + "\n![mean accuracy](compare.png)\n")
    figure(runs, out / "compare.png")
    return text
