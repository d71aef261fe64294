"""Several runs side by side: one table of their summaries (with the settings in which they
differ) and one figure of their mean accuracy per round.

    fedmd-ray compare runs/a runs/b runs/c --out runs/compare
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray.config import flatten
from fedmd_ray.errors import ConfigError
from fedmd_ray.phases import Phase
from fedmd_ray.report import integer_rounds, is_result
from fedmd_ray.storage import Storage

METRICS = "metrics.parquet"  # results.METRICS (a sibling layer)

COLUMNS = (
    ("lower_bound", "lower bound"),
    ("fedmd_final", "FedMD final"),
    ("fedmd_last3", "FedMD last 3"),
    ("fedmd_best", "FedMD best"),
    ("upper_bound", "upper bound"),
    ("gain", "gain"),
)


def load_run(location: str | Path) -> dict:
    """A run folder's (or a URI's: storage.py) summary, config and per-round mean accuracy."""
    storage = Storage(location)
    summary, config = storage.read_json("summary.json"), storage.read_json("config.json")
    if not isinstance(summary, dict) or not isinstance(config, dict):
        raise ConfigError(
            f"{storage} is not a finished fedmd-ray run folder (it needs readable summary.json and "
            "config.json; a run writes them when it ends, or stops)."
        )
    curve: dict[int, list[float]] = {}
    if storage.exists(METRICS):
        columns = ["round", "participant", "phase", "accuracy", "note"]
        try:
            rows = pq.read_table(storage.path(METRICS), columns=columns, filesystem=storage.fs).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ConfigError(f"{storage.location(METRICS)} cannot be read ({exc}).") from None
        for r in rows:
            if is_result(r, Phase.EVALUATE):
                curve.setdefault(r["round"], []).append(r["accuracy"])
    return {
        "path": location,
        "summary": summary,
        "config": config,
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


def figure(runs: list[dict]) -> bytes:
    """The runs' mean accuracy per round, as PNG bytes."""
    import io

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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def compare(paths: list[str], out: str | Path) -> str:
    """Write compare.md and compare.png into `out` (a folder or a URI); return the table."""
    if len(paths) < 2:
        raise ConfigError("fedmd-ray compare needs at least two run folders.")
    runs = [load_run(p) for p in paths]
    storage = Storage(out)
    storage.check_writable()
    text = table(runs)
    storage.write_text("compare.md", "# FedMD runs compared\n\n" + text + "\n![mean accuracy](compare.png)\n")
    storage.write_bytes("compare.png", figure(runs))
    return text
