"""What a person reads after a run: the summary table (the paper's comparison, per
participant), the accuracy figures, and the one-line progress of each phase."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa

from fedmd_ray.config import Config
from fedmd_ray.phases import Phase

ALL = "*"  # the participant column of metrics rows that time a whole phase


@dataclass
class SummaryRow:
    """One participant's run: its bounds, what FedMD reached, and what it moved."""

    participant: str
    model: str | None
    parameters: int | None
    adversary: bool
    lower_bound: float
    """Test accuracy after transfer learning: the model trained alone."""
    fedmd_final: float
    fedmd_best: float
    fedmd_last3: float
    """The mean of the last three rounds: a lucky or unlucky last round does not decide it."""
    upper_bound: float
    """This architecture trained on everyone's private data pooled (NaN when skipped)."""
    gain: float
    """fedmd_final - lower_bound."""
    bytes_per_round: float
    """Scores out and consensus in, per round taken part in."""
    fedavg_bytes_per_round: int | None
    """What FedAvg would move: every float32 parameter up and down."""
    epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SummaryRow:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def not_repeatable(config: Config) -> list[str]:
    """The settings of `config` that make its numbers depend on more than the config
    (every other run with the same config computes the same numbers)."""
    r, why = config.resources, []
    if r.deadline_s is not None or r.quorum < 1:
        why.append("who answers in time (resources.deadline_s, resources.quorum) depends on timing")
    if (
        config.sharing.clip is not None
        and config.sharing.noise_multiplier > 0
        and config.sharing.noise_seed == "secret"
    ):
        why.append(
            "differential-privacy noise from the operating system's entropy (sharing.noise_seed=secret)"
        )
    return why


def is_result(row: dict, phase: str) -> bool:
    """Whether metrics `row` is a participant's own result of `phase`: not a whole phase's
    timing (participant '*') nor an event (sat out, late, restarted), which carry no numbers."""
    return row["phase"] == phase and row["participant"] != ALL and not row.get("note")


def describe_accuracy(values: list[float]) -> str:
    if not values:
        return "no accuracy"
    return f"accuracy mean {np.mean(values):.3f} (min {np.min(values):.3f}, max {np.max(values):.3f})"


def mean_row(summary: list[SummaryRow]) -> dict:
    """Means over the honest participants, of the values that exist (no upper bound when it
    was skipped). Adversaries are left out: their accuracy is not what a defence protects."""
    keys = (
        "lower_bound",
        "fedmd_final",
        "fedmd_best",
        "fedmd_last3",
        "upper_bound",
        "gain",
        "bytes_per_round",
        "fedavg_bytes_per_round",
    )
    honest = [r for r in summary if not r.adversary]
    out = {}
    for k in keys:
        values = [
            getattr(r, k) for r in honest if getattr(r, k) is not None and not math.isnan(getattr(r, k))
        ]
        out[k] = float(np.mean(values)) if values else float("nan")
    return out


def _kib(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x / 1024:,.0f}"


MANY = 40
"""Above this many participants, tables and figures show distributions, not one row or
curve each (summary.json keeps every participant)."""


def _distribution_rows(summary: list[SummaryRow], pct: Callable[[float], str]) -> list[str]:
    rows = []
    keys = ("lower_bound", "fedmd_final", "fedmd_last3", "fedmd_best", "upper_bound", "gain")
    values = {
        k: np.array([getattr(r, k) for r in summary if getattr(r, k) is not None], dtype=float) for k in keys
    }
    for label, q in (
        ("min", 0),
        ("10th percentile", 10),
        ("median", 50),
        ("90th percentile", 90),
        ("max", 100),
    ):
        cells = []
        for k in keys:
            v = values[k][~np.isnan(values[k])]
            x = float(np.percentile(v, q)) if len(v) else float("nan")
            cells.append(f"{100 * x:+.1f}" if k == "gain" and not math.isnan(x) else pct(x))
        rows.append(f"| *{label} of {len(summary)}* | | | " + " | ".join(cells) + " | | |")
    return rows


def describe_mps(status: dict[str, dict]) -> str:
    """Where MPS ran (placement.json's "mps": node id -> what backends/mps.py found), and why
    not elsewhere."""
    if not status:
        return "no GPU node was found, so nothing was started"
    on = [n for n, s in status.items() if s.get("mps") == "on"]
    parts = [f"on for {len(on)} of {len(status)} GPU nodes"]
    parts += [
        f"node {n[:8]} without it: {s.get('why', '?')}" for n, s in status.items() if s.get("mps") != "on"
    ]
    return "; ".join(parts)


def render_summary(
    summary: list[SummaryRow],
    config: Config,
    complete: bool = True,
    epsilon: float | None = None,
    together: tuple[int, int] | list[int] | None = None,
    mps: dict | str | None = None,
    chance: float | None = None,
    public_samples: int | None = None,
) -> str:
    """The paper's comparison as a Markdown table, with what each participant moved; with
    `chance` (1 / the private task's classes), who ended no better than guessing; with
    `public_samples`, the subset a round really draws when the config asks for more."""

    def pct(x: float) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    lines = [f"# FedMD run `{config.name}`", ""]
    if not complete:
        lines += ["**Incomplete run**: it stopped early; the table shows the last round reached.", ""]
    t, sh = config.train, config.sharing
    subset = f"public subset {t.public_subset_size}"
    if public_samples is not None and t.public_subset_size > public_samples:
        subset = f"public subset {public_samples} (all the public data; train.public_subset_size={t.public_subset_size})"
    lines += [
        f"{len(summary)} participants, {t.rounds} rounds, {subset}, "
        f"consensus `{t.consensus}`, digest loss `{t.digest_loss}`, payload `{sh.payload}`, "
        f"backend `{config.resources.backend}`, seed {config.seed}.",
        "",
    ]
    unrepeatable = not_repeatable(config)
    if unrepeatable:
        lines += [
            f"**Not repeatable**: {'; '.join(unrepeatable)}. The same config may give other numbers.",
            "",
        ]
    if config.resources.mps == "auto":
        said = mps if isinstance(mps, str) else describe_mps(mps or {})
        lines += [f"**NVIDIA MPS** (resources.mps=auto): {said}.", ""]
    if config.resources.group:
        alone, grouped = together or (0, 0)
        lines += [
            "**Grouped** (resources.group): participants of one model on one pool actor took their "
            "digest and revisit (on a GPU also scores and evaluation) together as one stacked model. "
            "The numbers repeat for this seed and pool size, and equal the one-at-a-time numbers only "
            f"up to floating-point reordering. {grouped} of {grouped + alone} such calls ran in a group"
            + (
                "; the rest ran one at a time (a lone member of its model, the safeguard, a digest "
                "loss or dropout of its own, or a model vmap cannot run)."
                if alone
                else "."
            ),
            "",
        ]
    if sh.adversaries:
        lines += [
            f"Adversaries (`{sh.attack}`, scale {sh.attack_scale:g}): "
            f"{', '.join(r.participant for r in summary if r.adversary)}; "
            "the mean row covers honest participants only.",
            "",
        ]
    if sh.clip is not None:
        from fedmd_ray.privacy import resolve

        eps = "∞ (no noise)" if epsilon is None or math.isinf(epsilon) else f"{epsilon:.3g}"
        who = {"pld": "dp-accounting's PLD", "rdp": "dp-accounting's RDP", "gdp": "closed-form Gaussian DP"}
        lines += [
            f"Differential privacy: scores clipped to L2 {sh.clip:g}, noise multiplier "
            f"{sh.noise_multiplier:g}; epsilon {eps} at delta {sh.delta:g} for the participant that "
            f"released most often over the run ({who[resolve(sh.accountant)]} accountant; noise "
            f"{'seeded from the config' if sh.noise_seed == 'config' else 'from OS entropy'}).",
            "",
        ]
    lines += [
        "Test accuracy (%) on the private task (FedMD last 3: the mean of the last three rounds), "
        "and KiB each participant moved per round "
        "(FedMD: scores out + consensus in; FedAvg: its float32 parameters up and down):",
        "",
        "| participant | model | params | lower bound | FedMD final | FedMD last 3 | FedMD best | upper bound "
        "| gain | KiB/round | FedAvg KiB/round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    m = mean_row(summary)
    guessing = no_better_than_chance(summary, chance)
    if len(summary) > MANY:
        lines += _distribution_rows(summary, pct)
        summary = []  # one row per participant is in summary.json, not here
    for r in summary:
        flag = " (adversary)" if r.adversary else ""
        lines.append(
            f"| {r.participant}{flag} | `{r.model}` | {r.parameters or '–'} | "
            f"{pct(r.lower_bound)} | {pct(r.fedmd_final)} | {pct(r.fedmd_last3)} | "
            f"{pct(r.fedmd_best)} | "
            f"{pct(r.upper_bound)} | {100 * r.gain:+.1f} | {_kib(r.bytes_per_round)} | "
            f"{_kib(r.fedavg_bytes_per_round)} |"
        )
    lines.append(
        f"| **mean** | | | {pct(m['lower_bound'])} | {pct(m['fedmd_final'])} | {pct(m['fedmd_last3'])} | "
        f"{pct(m['fedmd_best'])} | {pct(m['upper_bound'])} | **{100 * m['gain']:+.1f}** | "
        f"{_kib(m['bytes_per_round'])} | {_kib(m['fedavg_bytes_per_round'])} |"
    )
    if guessing:
        lines += ["", f"**No better than chance**: {guessing_text(guessing, chance)}"]
    return "\n".join(lines) + "\n"


def no_better_than_chance(summary: list[SummaryRow], chance: float | None) -> list[str]:
    """Honest participants whose model ended the run at or below `chance` accuracy."""
    if chance is None:
        return []
    return [r.participant for r in summary if not r.adversary and r.fedmd_final <= chance + 1e-9]


def guessing_text(names: list[str], chance: float | None) -> str:
    """Why a model no better than chance matters, and where to look (summary and progress)."""
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (
        f"{shown}: {100 * (chance or 0):.1f} % or less on the private task, no better than guessing "
        f"among its {round(1 / chance) if chance else '?'} classes: their training did not take. "
        "Too few epochs or samples for the model, or a learning rate that made it diverge "
        "(train.lr, train.digest_lr): their losses in metrics.parquet tell which."
    )


def accuracy_curves(table: pa.Table, summary: list[SummaryRow]) -> dict[str, dict[int, float]]:
    """Per participant: round -> test accuracy, round 0 being its lower bound."""
    out = {r.participant: {0: r.lower_bound} for r in summary}
    for r in table.select(["round", "participant", "phase", "accuracy", "note"]).to_pylist():
        if is_result(r, Phase.EVALUATE):
            out[r["participant"]][r["round"]] = r["accuracy"]
    return out


def plot_accuracy(
    table: pa.Table, summary: list[SummaryRow], path: Path | IO[bytes], title: str, panels: bool = True
) -> None:
    """Left: the paper's figure (every participant per round, upper bounds dashed).
    Right, with `panels`: one small panel per participant with its lower and upper bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(summary) > MANY:
        _plot_many(table, summary, path, title)
        return
    curves = {name: sorted(c.items()) for name, c in accuracy_curves(table, summary).items()}
    shown = summary[:20]
    cols = min(5, max(1, len(shown)))
    grid_rows = math.ceil(len(shown) / cols)
    if panels:
        fig = plt.figure(figsize=(5 + 2.4 * cols, max(4.0, 2.1 * grid_rows)), constrained_layout=True)
        sub = fig.subfigures(1, 2, width_ratios=[5, 2.4 * cols])
        ax = sub[0].subplots()
    else:
        fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(summary) <= 10 else "tab20")
    for i, r in enumerate(summary):
        xs, ys = zip(*curves[r.participant])
        color = colors(i % colors.N)
        ax.plot(xs, ys, "-o", ms=2.5, color=color, label=r.participant)
        if not math.isnan(r.upper_bound):
            ax.axhline(r.upper_bound, color=color, ls="--", lw=0.9, alpha=0.7)
    ax.set(
        xlabel="round (0 = after transfer learning)",
        ylabel="test accuracy",
        title=f"{title}: FedMD per participant (dashed: upper bound)",
    )
    ax.grid(alpha=0.3)
    integer_rounds(ax)
    if len(summary) <= 12:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    if panels:
        _participant_panels(sub[1], shown, curves, colors, grid_rows, cols)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _plot_many(table: pa.Table, summary: list[SummaryRow], path: Path | IO[bytes], title: str) -> None:
    """Many participants: the spread of accuracy per round (median, 10th-90th percentile
    band, min-max) instead of a curve each, and the distribution of gains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.compute as pc

    t = table.select(["round", "participant", "phase", "accuracy", "note"])
    own = pc.and_(pc.equal(t["phase"], str(Phase.EVALUATE)), pc.not_equal(t["participant"], ALL))
    evals = t.filter(pc.and_(own, pc.is_null(t["note"])))
    rounds = np.asarray(evals["round"].to_numpy(zero_copy_only=False))
    accs = np.asarray(evals["accuracy"].to_numpy(zero_copy_only=False), dtype=float)
    lower = np.array([r.lower_bound for r in summary], dtype=float)
    xs = [0, *sorted(set(rounds.tolist()))]
    by = [lower] + [accs[rounds == r] for r in xs[1:]]
    q = np.array([np.nanpercentile(v, [0, 10, 50, 90, 100]) for v in by])
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True, width_ratios=[3, 2])
    ax.fill_between(xs, q[:, 0], q[:, 4], color="tab:blue", alpha=0.12, lw=0, label="min-max")
    ax.fill_between(xs, q[:, 1], q[:, 3], color="tab:blue", alpha=0.3, lw=0, label="10th-90th percentile")
    ax.plot(xs, q[:, 2], "-o", color="tab:blue", ms=3, label="median")
    ax.plot(xs, [float(np.nanmean(v)) for v in by], "--", color="black", lw=1, label="mean")
    upper = np.array([r.upper_bound for r in summary], dtype=float)
    if not np.isnan(upper).all():
        ax.axhline(float(np.nanmean(upper)), color="tab:red", ls="--", lw=1, label="mean upper bound")
    ax.set(
        xlabel="round (0 = after transfer learning)",
        ylabel="test accuracy",
        title=f"{title}: {len(summary)} participants",
    )
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    gains = np.array([r.gain for r in summary], dtype=float)
    hx.hist(gains[~np.isnan(gains)], bins=40, color="tab:green", alpha=0.8)
    hx.axvline(0, color="black", lw=1)
    hx.set(xlabel="gain over the lower bound (final - lower)", ylabel="participants", title="gains")
    hx.grid(alpha=0.3)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def integer_rounds(ax) -> None:
    """Rounds are whole numbers: no tick at round 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _participant_panels(
    fig, shown: list[SummaryRow], curves: dict, colors, grid_rows: int, cols: int
) -> None:
    axes = np.atleast_1d(fig.subplots(grid_rows, cols, sharex=True, sharey=True)).ravel()
    for i, (a, r) in enumerate(zip(axes, shown)):
        xs, ys = zip(*curves[r.participant])
        a.plot(xs, ys, "-", color=colors(i % colors.N), lw=1.5)
        a.axhline(r.lower_bound, color="grey", ls=":", lw=1)
        if not math.isnan(r.upper_bound):
            a.axhline(r.upper_bound, color="black", ls="--", lw=1)
        a.set_title(f"{r.participant}  {100 * r.gain:+.1f} pts", fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
        integer_rounds(a)
    for a in axes[len(shown) :]:
        a.axis("off")
    fig.suptitle("dotted: lower bound   dashed: upper bound", fontsize=8)
