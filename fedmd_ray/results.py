"""What a run leaves behind: metrics as Parquet (rewritten after every round, so a crash
keeps what was done), the resolved config, the partition report, a summary table and plot,
and the progress lines a person watches."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray.config import Config
from fedmd_ray.files import atomic_write
from fedmd_ray.tracking import open_trackers, round_scalars

SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("participant", pa.string()),
        ("model", pa.string()),
        ("phase", pa.string()),
        ("accuracy", pa.float64()),
        ("loss", pa.float64()),
        ("seconds", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("bytes_sent", pa.int64()),
        ("bytes_received", pa.int64()),
        ("epsilon", pa.float64()),
        ("note", pa.string()),
    ]
)
ALL = "*"  # the participant column of rows that time a whole phase


def is_result(row: dict, phase: str) -> bool:
    """Whether `row` is a participant's own result of `phase`: not a whole phase's timing
    (participant '*') nor an event (sat out, late, restarted), which carry no numbers."""
    return row["phase"] == phase and row["participant"] != ALL and not row.get("note")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class Clock:
    seconds: float = 0.0


class Recorder:
    """Every result of a run, as rows (SCHEMA), and what the summary needs of them.

    With a results folder, rows go to disk as they come: metrics.parquet is a Parquet
    dataset (a folder of part files, one written per round, read back whole by
    `pyarrow.parquet.read_table`), so writing a round costs that round's rows, not the whole
    run's, and a run stopped early keeps every round it finished. Only the aggregates the
    summary needs stay in memory (per participant: bounds, accuracy per round, bytes), so
    ten thousand participants fit."""

    def __init__(self, out_dir: str | Path | None, config: Config, task, say: Callable[[str], None]):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.config = config
        self.say = say
        self.pending: list[dict] = []
        """Rows not yet on disk (all rows, when there is no results folder)."""
        self.current: list[dict] = []
        """The rows of the round under way (for its progress line and the trackers)."""
        self.parts = 0
        self.models = {r["participant"]: None for r in task.partition_report}
        self.info: list[dict] = []
        self.epsilons: dict[str, float | None] = {}
        """Differential privacy: epsilon each participant has spent (its own releases)."""
        self._clear()
        self.complete = False
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_json("config.json", config.to_dict())
            self._write_json("partition.json", task.partition_report)
        self.trackers = open_trackers(config.log, self.out_dir, config.to_dict(), config.name)

    def _clear(self) -> None:
        self.lower: dict[str, float] = {}
        self.upper: dict[str, float] = {}
        self.accuracy: dict[str, dict[int, float]] = {}
        self.moved: dict[str, list[int]] = {}
        self.events: dict[str, list[str]] = {}
        self.event_counts: dict[str, int] = {}
        self.last_epsilon: float | None = None

    def _write_json(self, name: str, data: Any) -> None:
        assert self.out_dir is not None
        atomic_write(
            self.out_dir / name,
            lambda p: p.write_text(json.dumps(data, indent=2, default=_json_default) + "\n"),
        )

    # ------------------------------------------------------------ recording

    @staticmethod
    @contextmanager
    def timer() -> Iterator[Clock]:
        """Time a phase on the driver: `with recorder.timer() as clock: ...`, then
        `clock.seconds`."""
        clock = Clock()
        start = time.perf_counter()
        try:
            yield clock
        finally:
            clock.seconds = time.perf_counter() - start

    def participants(self, info: list[dict], placement: dict | None = None) -> None:
        self.info = info
        self.models = {d["participant"]: d["model"] for d in info}
        if self.out_dir is not None:
            self._write_json("participants.json", info)
            if placement is not None:
                self._write_json("placement.json", placement)

    def _row(self, round_: int, participant: str, phase: str, **values: Any) -> None:
        row = dict.fromkeys(SCHEMA.names)
        row.update(
            round=round_,
            participant=participant,
            model=self.models.get(participant),
            phase=phase,
            bytes_sent=0,
            bytes_received=0,
        )
        row.update(values)
        self.pending.append(row)
        self.current.append(row)
        self._absorb(row)

    def _absorb(self, r: dict) -> None:
        """Fold one row into the aggregates the summary reads."""
        name = r["participant"]
        if r.get("note"):
            self.event_counts[r["note"]] = self.event_counts.get(r["note"], 0) + 1
            shown = self.events.setdefault(r["note"], [])
            if len(shown) < 12:
                shown.append(f"{name} (round {r['round']})")
            return
        if name == ALL:
            if r["phase"] == "communicate" and r.get("epsilon") is not None:
                self.last_epsilon = r["epsilon"]
            return
        phase = r["phase"]
        if phase == "transfer":
            self.lower[name] = r["accuracy"]
        elif phase == "upper_bound":
            self.upper[name] = r["accuracy"]
        elif phase == "evaluate":
            self.accuracy.setdefault(name, {})[r["round"]] = r["accuracy"]
        elif phase == "digest":
            self.moved.setdefault(name, []).append((r["bytes_sent"] or 0) + (r["bytes_received"] or 0))

    def phase(
        self, round_: int, phase: str, results: list[dict], wall_seconds: float, who: list[int] | None = None
    ) -> None:
        """One row per participant (those in `who`, default all) for a phase they ran."""
        names = list(self.models)
        chosen = names if who is None else [names[i] for i in who]
        for name, res in zip(chosen, results, strict=True):
            self._row(
                round_,
                name,
                phase,
                accuracy=res.get("accuracy"),
                loss=res.get("loss"),
                seconds=res.get("seconds"),
                wall_seconds=wall_seconds,
                bytes_sent=res.get("bytes_sent", 0),
                bytes_received=res.get("bytes_received", 0),
            )
            if "communicate_seconds" in res:
                # The scores' compute time, reported by the participant with its digest.
                self._row(round_, name, "communicate", seconds=res["communicate_seconds"])
        if phase in ("transfer", "upper_bound"):
            label = "lower bound (transfer learning)" if phase == "transfer" else "upper bound (pooled)"
            self.say(
                f"{label}: {_describe_accuracy([r['accuracy'] for r in results])}  [{wall_seconds:.1f}s]"
            )
            self.flush()

    def note(self, round_: int, names: list[str], note: str, phase: str = "communicate") -> None:
        """Participants that sat a round out, were late, or were restarted."""
        for name in names:
            self._row(round_, name, phase, note=note)
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            self.say(f"round {round_:>3}: {shown} {note}")

    def resume(self, round_: int) -> None:
        """Take back the rows of rounds up to `round_` from the run's metrics, and drop the
        rest from disk (they are about to be recomputed)."""
        path = self.out_dir / "metrics.parquet" if self.out_dir is not None else None
        if path is None or not path.exists():
            return
        rows = [r for r in pq.read_table(path).to_pylist() if r["round"] <= round_]
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()  # a single-file metrics.parquet of an older version: made a dataset
        self._clear()
        self.pending, self.current, self.parts = [], [], 0
        for r in rows:
            r.setdefault("note", None)
            self.pending.append(r)
            self._absorb(r)
        self.flush()

    def timing(self, round_: int, phase: str, wall_seconds: float, epsilon: float | None = None) -> None:
        """A whole phase's wall time on the driver (participant '*')."""
        self._row(round_, ALL, phase, wall_seconds=wall_seconds, epsilon=epsilon)

    def end_round(self, round_: int, rounds: int) -> None:
        now = [r for r in self.current if r["round"] == round_]
        self.current = []
        acc = [r["accuracy"] for r in now if is_result(r, "evaluate")]
        lower = self.lower
        gain = np.mean(acc) - np.mean(list(lower.values())) if lower and acc else float("nan")
        walls = {r["phase"]: r["wall_seconds"] for r in now if r["wall_seconds"] is not None}
        phases = " ".join(
            f"{p} {walls[p]:.1f}s"
            for p in ("communicate", "aggregate", "digest", "revisit", "evaluate")
            if p in walls
        )
        self.say(f"round {round_:>3}/{rounds}: {_describe_accuracy(acc)}  gain {gain:+.3f}  [{phases}]")
        self.flush()
        if self.trackers:
            scalars = round_scalars(now, lower)
            for tracker in self.trackers:
                tracker.log_round(round_, scalars)

    # ------------------------------------------------------------ reading back

    def table(self) -> pa.Table:
        """Every row so far: what is on disk, then what is not yet."""
        path = self.out_dir / "metrics.parquet" if self.out_dir is not None else None
        pending = pa.Table.from_pylist(self.pending, schema=SCHEMA)
        if path is None or not path.exists():
            return pending
        written = pq.read_table(path, schema=SCHEMA)
        return pa.concat_tables([written, pending]) if self.pending else written

    def summary(self) -> list[dict]:
        """Per participant: lower bound, FedMD final, last three rounds' mean and best,
        upper bound, gain."""
        params = {d["participant"]: d.get("parameters") for d in self.info}
        adversaries = {list(self.models)[i] for i in self.config.sharing.adversaries}
        rows = []
        for name in self.models:
            lo = self.lower.get(name, float("nan"))
            by_round = sorted(self.accuracy.get(name, {}).items())
            fin = by_round[-1][1] if by_round else lo
            # The last three rounds' mean: a lucky or unlucky last round does not decide it.
            last3 = float(np.mean([acc for _, acc in by_round[-3:]])) if by_round else lo
            n_params = params.get(name)
            moved = self.moved.get(name)
            rows.append(
                {
                    "participant": name,
                    "model": self.models[name],
                    "parameters": n_params,
                    "adversary": name in adversaries,
                    "lower_bound": lo,
                    "fedmd_final": fin,
                    "fedmd_best": max((acc for _, acc in by_round), default=lo),
                    "fedmd_last3": last3,
                    "upper_bound": self.upper.get(name, float("nan")),
                    "gain": fin - lo,
                    "bytes_per_round": float(np.mean(moved)) if moved else 0.0,
                    # FedAvg would upload and download every float32 parameter each round.
                    "fedavg_bytes_per_round": 2 * 4 * n_params if n_params else None,
                    "epsilon": self.epsilons.get(name),
                }
            )
        return rows

    def _events(self) -> str:
        """Who sat rounds out, was late, or was restarted (markdown; empty when nobody)."""
        if not self.events:
            return ""
        lines = ["", "Events:", ""]
        for note, where in self.events.items():
            count = self.event_counts[note]
            shown = ", ".join(where) + (f", ... ({count} in all)" if count > len(where) else "")
            lines.append(f"- {note}: {shown}")
        return "\n".join(lines) + "\n"

    def epsilon(self) -> float | None:
        """Epsilon spent so far by the most-exposed participant (None when privacy is off)."""
        return self.last_epsilon

    # ------------------------------------------------------------ writing

    def flush(self) -> None:
        """Write the rows not yet on disk as the next part of metrics.parquet."""
        if self.out_dir is None or not self.pending:
            return
        folder = self.out_dir / "metrics.parquet"
        folder.mkdir(exist_ok=True)
        table = pa.Table.from_pylist(self.pending, schema=SCHEMA)
        atomic_write(folder / f"part-{self.parts:06d}.parquet", lambda p: pq.write_table(table, p))
        self.parts += 1
        self.pending = []

    def finish(self, complete: bool) -> None:
        self.complete = complete
        self.flush()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.out_dir is None or not self.lower:
            return
        summary = self.summary()
        epsilon = self.epsilon()
        self._write_json(
            "summary.json",
            {
                "complete": complete,
                "participants": summary,
                "mean": _mean_row(summary),
                "epsilon": epsilon,
                "delta": self.config.sharing.delta if epsilon is not None else None,
            },
        )
        (self.out_dir / "summary.md").write_text(
            render_summary(summary, self.config, complete, epsilon) + self._events()
        )
        try:
            plot_accuracy(self.table(), summary, self.out_dir / "accuracy.png", self.config.name)
        except Exception as exc:  # a plotting problem must not lose the run's results
            self.say(f"(plot skipped: {exc})")
        self.say(f"results in {self.out_dir}/ (metrics.parquet, summary.md, accuracy.png)")


def _describe_accuracy(values: list[float]) -> str:
    if not values:
        return "no accuracy"
    return f"accuracy mean {np.mean(values):.3f} (min {np.min(values):.3f}, max {np.max(values):.3f})"


def _mean_row(summary: list[dict]) -> dict:
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
    honest = [r for r in summary if not r.get("adversary")]
    out = {}
    for k in keys:
        values = [r[k] for r in honest if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = float(np.mean(values)) if values else float("nan")
    return out


def _kib(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x / 1024:,.0f}"


MANY = 40
"""Above this many participants, tables and figures show distributions, not one row or
curve each (summary.json keeps every participant)."""


def _distribution_rows(summary: list[dict], pct: Callable[[float], str]) -> list[str]:
    rows = []
    keys = ("lower_bound", "fedmd_final", "fedmd_last3", "fedmd_best", "upper_bound", "gain")
    values = {k: np.array([r[k] for r in summary if r.get(k) is not None], dtype=float) for k in keys}
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


def render_summary(
    summary: list[dict], config: Config, complete: bool = True, epsilon: float | None = None
) -> str:
    """The paper's comparison as a Markdown table, with what each participant moved."""

    def pct(x: float) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    lines = [f"# FedMD run `{config.name}`", ""]
    if not complete:
        lines += ["**Incomplete run**: it stopped early; the table shows the last round reached.", ""]
    t, sh = config.train, config.sharing
    lines += [
        f"{len(summary)} participants, {t.rounds} rounds, public subset {t.public_subset_size}, "
        f"consensus `{t.consensus}`, digest loss `{t.digest_loss}`, payload `{sh.payload}`, "
        f"backend `{config.resources.backend}`, seed {config.seed}.",
        "",
    ]
    if sh.adversaries:
        lines += [
            f"Adversaries (`{sh.attack}`, scale {sh.attack_scale:g}): "
            f"{', '.join(r['participant'] for r in summary if r['adversary'])}; "
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
    m = _mean_row(summary)
    if len(summary) > MANY:
        lines += _distribution_rows(summary, pct)
        summary = []  # one row per participant is in summary.json, not here
    for r in summary:
        flag = " (adversary)" if r.get("adversary") else ""
        lines.append(
            f"| {r['participant']}{flag} | `{r['model']}` | {r['parameters'] or '–'} | "
            f"{pct(r['lower_bound'])} | {pct(r['fedmd_final'])} | {pct(r.get('fedmd_last3'))} | "
            f"{pct(r['fedmd_best'])} | "
            f"{pct(r['upper_bound'])} | {100 * r['gain']:+.1f} | {_kib(r.get('bytes_per_round'))} | "
            f"{_kib(r.get('fedavg_bytes_per_round'))} |"
        )
    lines.append(
        f"| **mean** | | | {pct(m['lower_bound'])} | {pct(m['fedmd_final'])} | {pct(m['fedmd_last3'])} | "
        f"{pct(m['fedmd_best'])} | {pct(m['upper_bound'])} | **{100 * m['gain']:+.1f}** | "
        f"{_kib(m['bytes_per_round'])} | {_kib(m['fedavg_bytes_per_round'])} |"
    )
    return "\n".join(lines) + "\n"


def accuracy_curves(table: pa.Table, summary: list[dict]) -> dict[str, dict[int, float]]:
    """Per participant: round -> test accuracy, round 0 being its lower bound."""
    out = {r["participant"]: {0: r["lower_bound"]} for r in summary}
    for r in table.select(["round", "participant", "phase", "accuracy", "note"]).to_pylist():
        if is_result(r, "evaluate"):
            out[r["participant"]][r["round"]] = r["accuracy"]
    return out


def plot_accuracy(table: pa.Table, summary: list[dict], path: Path, title: str, panels: bool = True) -> None:
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
        xs, ys = zip(*curves[r["participant"]])
        color = colors(i % colors.N)
        ax.plot(xs, ys, "-o", ms=2.5, color=color, label=r["participant"])
        if not math.isnan(r["upper_bound"]):
            ax.axhline(r["upper_bound"], color=color, ls="--", lw=0.9, alpha=0.7)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_many(table: pa.Table, summary: list[dict], path: Path, title: str) -> None:
    """Many participants: the spread of accuracy per round (median, 10th-90th percentile
    band, min-max) instead of a curve each, and the distribution of gains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.compute as pc

    t = table.select(["round", "participant", "phase", "accuracy", "note"])
    own = pc.and_(pc.equal(t["phase"], "evaluate"), pc.not_equal(t["participant"], ALL))
    evals = t.filter(pc.and_(own, pc.is_null(t["note"])))
    rounds = np.asarray(evals["round"].to_numpy(zero_copy_only=False))
    accs = np.asarray(evals["accuracy"].to_numpy(zero_copy_only=False), dtype=float)
    lower = np.array([r["lower_bound"] for r in summary], dtype=float)
    xs = [0, *sorted(set(rounds.tolist()))]
    by = [lower] + [accs[rounds == r] for r in xs[1:]]
    q = np.array([np.nanpercentile(v, [0, 10, 50, 90, 100]) for v in by])
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True, width_ratios=[3, 2])
    ax.fill_between(xs, q[:, 0], q[:, 4], color="tab:blue", alpha=0.12, lw=0, label="min-max")
    ax.fill_between(xs, q[:, 1], q[:, 3], color="tab:blue", alpha=0.3, lw=0, label="10th-90th percentile")
    ax.plot(xs, q[:, 2], "-o", color="tab:blue", ms=3, label="median")
    ax.plot(xs, [float(np.nanmean(v)) for v in by], "--", color="black", lw=1, label="mean")
    upper = np.array([r["upper_bound"] for r in summary], dtype=float)
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
    gains = np.array([r["gain"] for r in summary], dtype=float)
    hx.hist(gains[~np.isnan(gains)], bins=40, color="tab:green", alpha=0.8)
    hx.axvline(0, color="black", lw=1)
    hx.set(xlabel="gain over the lower bound (final - lower)", ylabel="participants", title="gains")
    hx.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def integer_rounds(ax) -> None:
    """Rounds are whole numbers: no tick at round 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _participant_panels(fig, shown: list[dict], curves: dict, colors, grid_rows: int, cols: int) -> None:
    axes = np.atleast_1d(fig.subplots(grid_rows, cols, sharex=True, sharey=True)).ravel()
    for i, (a, r) in enumerate(zip(axes, shown)):
        xs, ys = zip(*curves[r["participant"]])
        a.plot(xs, ys, "-", color=colors(i % colors.N), lw=1.5)
        a.axhline(r["lower_bound"], color="grey", ls=":", lw=1)
        if not math.isnan(r["upper_bound"]):
            a.axhline(r["upper_bound"], color="black", ls="--", lw=1)
        a.set_title(f"{r['participant']}  {100 * r['gain']:+.1f} pts", fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
        integer_rounds(a)
    for a in axes[len(shown) :]:
        a.axis("off")
    fig.suptitle("dotted: lower bound   dashed: upper bound", fontsize=8)


def phase_walls(rows: list[dict]) -> dict[tuple[int, str], float]:
    """Wall seconds of each (round, phase), as the driver timed it (every participant row of
    a phase carries the same wall time; whole-phase rows have participant '*')."""
    return {(r["round"], r["phase"]): r["wall_seconds"] for r in rows if r["wall_seconds"] is not None}


def seconds_per_round(rows: list[dict]) -> float:
    """Mean wall seconds of a collaboration round (transfer learning and bounds excluded)."""
    walls = phase_walls(rows)
    rounds = {r for r, phase in walls if r >= 1 and phase not in ("transfer", "upper_bound")}
    total = sum(s for (r, phase), s in walls.items() if r >= 1 and phase not in ("transfer", "upper_bound"))
    return total / max(1, len(rounds))
