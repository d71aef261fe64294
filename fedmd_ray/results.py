"""What a run records as it goes: metrics as Parquet (a part per round, so a crash keeps what
was done), the resolved config, the partition report, and at the end the summary and the
figure (report.py renders them), into the run's storage (a folder or a URI: storage.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmd_ray.config import Config
from fedmd_ray.errors import ParticipantError
from fedmd_ray.phases import ROUND_PHASES, Phase
from fedmd_ray.protocol import Event, Scores
from fedmd_ray.report import (
    ALL,
    SummaryRow,
    describe_accuracy,
    guessing_text,
    is_result,
    mean_row,
    no_better_than_chance,
    plot_accuracy,
    render_summary,
)
from fedmd_ray.storage import Storage
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
        ("together", pa.int32()),  # resources.group: the size of the group the call ran in
    ]
)
METRICS = "metrics.parquet"
ERROR = "error.txt"  # the traceback of a participant that failed
OUTPUTS = (
    METRICS,
    "checkpoint",  # checkpoint.FOLDER
    "tensorboard",
    "summary.md",
    "summary.json",
    "accuracy.png",
    "config.json",
    "partition.json",
    "participants.json",
    "placement.json",
    ERROR,
)
"""What a run writes in its folder. A new run there replaces exactly these: an earlier
run's rounds must not mix with its own, and a user's other files stay."""
SAFEGUARD_NOTE = "kept its model from before the round (safeguard)"

__all__ = ["ALL", "SCHEMA", "Recorder", "is_result", "phase_walls", "seconds_per_round"]


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

    def __init__(
        self,
        storage: Storage | None,
        config: Config,
        task,
        say: Callable[[str], None],
        track: bool = True,
        replace: bool = False,
    ):
        """With `replace`, an earlier run's results in the folder are removed first (a new
        run, not a resume)."""
        self.storage = storage
        self.config = config
        self.say = say
        self.pending: list[dict] = []
        """Rows not yet on disk (all rows, when there is no results folder)."""
        self.current: list[dict] = []
        """The rows of the round under way (for its progress line and the trackers)."""
        self.parts = 0
        self.models = {r["participant"]: None for r in task.partition_report}
        self.names = list(self.models)
        self.info: list[dict] = []
        classes = len(np.unique(task.private_test.y))
        self.chance = 1.0 / classes if classes else None
        """Accuracy on the private task of a model that guesses."""
        self.public_samples = len(task.public_train)
        self.epsilons: dict[str, float | None] = {}
        """Differential privacy: epsilon each participant has spent (its own releases)."""
        self._clear()
        self.complete = False
        if self.storage is not None:
            if replace:
                for name in OUTPUTS:
                    self.storage.delete(name)
            self.storage.makedirs()
            self._write_json("config.json", config.to_dict())
            self._write_json("partition.json", task.partition_report)
        self.trackers = (
            open_trackers(config.log, self.storage, config.to_dict(), config.name) if track else []
        )

    def _clear(self) -> None:
        self.lower: dict[str, float] = {}
        self.upper: dict[str, float] = {}
        self.accuracy: dict[str, dict[int, float]] = {}
        self.moved: dict[str, dict[int, int]] = {}
        """Per participant and round: bytes of scores sent plus consensus received."""
        self.events: dict[str, list[str]] = {}
        self.event_counts: dict[str, int] = {}
        self.last_epsilon: float | None = None
        self.together = [0, 0]
        """resources.group: calls computed alone, calls computed in a group."""
        self.mps: dict | str | None = None
        """resources.mps="auto": MPS on each GPU node (placement.json's "mps")."""

    def _write_json(self, name: str, data: Any) -> None:
        assert self.storage is not None
        self.storage.write_text(name, json.dumps(data, indent=2, default=_json_default) + "\n")

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
        self.mps = (placement or {}).get("mps")
        self.models = {d["participant"]: d["model"] for d in info}
        if self.storage is not None:
            self._write_json("participants.json", info)
            if placement is not None:
                self._write_json("placement.json", placement)

    def reopen(self) -> None:
        """Take back what the run wrote of its participants and placement (a run resumed
        with nothing left to compute starts none)."""
        if self.storage is None:
            return
        info, placement = (
            self.storage.read_json("participants.json"),
            self.storage.read_json("placement.json"),
        )
        if isinstance(info, list) and all(isinstance(d, dict) for d in info):
            self.info = info
            self.models.update(
                {d["participant"]: d.get("model") for d in info if d.get("participant") in self.models}
            )
        if isinstance(placement, dict):
            self.mps = placement.get("mps")

    def privacy_spent(self, epsilons: list[float | None] | None) -> None:
        """Differential privacy: each participant's epsilon so far (None: privacy is off)."""
        if epsilons is not None:
            self.epsilons = dict(zip(self.names, epsilons))

    def _row(self, round_: int, participant: str, phase: str, **values: Any) -> None:
        row = dict.fromkeys(SCHEMA.names)
        row.update(
            round=round_,
            participant=participant,
            model=self.models.get(participant),
            phase=str(phase),
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
        if r.get("together") is not None:
            self.together[r["together"] > 1] += 1
        if r.get("note"):
            self.event_counts[r["note"]] = self.event_counts.get(r["note"], 0) + 1
            shown = self.events.setdefault(r["note"], [])
            if len(shown) < 12:
                shown.append(f"{name} (round {r['round']})")
            return
        if name == ALL:
            if r["phase"] == Phase.COMMUNICATE and r.get("epsilon") is not None:
                self.last_epsilon = r["epsilon"]
            return
        phase = r["phase"]
        if phase == Phase.TRANSFER:
            self.lower[name] = r["accuracy"]
        elif phase == Phase.UPPER_BOUND:
            self.upper[name] = r["accuracy"]
        elif phase == Phase.EVALUATE:
            self.accuracy.setdefault(name, {})[r["round"]] = r["accuracy"]
        elif phase in (Phase.COMMUNICATE, Phase.DIGEST):
            moved = self.moved.setdefault(name, {})
            moved[r["round"]] = moved.get(r["round"], 0) + (r["bytes_sent"] or 0) + (r["bytes_received"] or 0)

    def phase(
        self,
        round_: int,
        phase: Phase,
        results: list[dict],
        wall_seconds: float,
        who: list[int] | None = None,
    ) -> None:
        """One row per participant (those in `who`, default all) for a phase they ran."""
        chosen = self.names if who is None else [self.names[i] for i in who]
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
                together=res.get("together"),
            )
        if phase in (Phase.TRANSFER, Phase.UPPER_BOUND):
            label = "lower bound (transfer learning)" if phase == Phase.TRANSFER else "upper bound (pooled)"
            self.say(f"{label}: {describe_accuracy([r['accuracy'] for r in results])}  [{wall_seconds:.1f}s]")
            # Before any round, the summary's final accuracy is the lower bound.
            guessing = no_better_than_chance(self.summary(), self.chance) if phase == Phase.TRANSFER else []
            if guessing:
                self.say(f"warning: {guessing_text(guessing, self.chance)}")
            self.flush()

    def scores(self, scores: Scores, epsilons: list[float | None] | None = None) -> None:
        """A round's communicate: each answered participant's row (seconds, bytes sent), the
        phase's wall time, who sat the round out and who was late. With `epsilons` (privacy
        spent per participant so far), the round's row carries the most-exposed one's."""
        round_ = scores.plan.round
        self.phase(round_, Phase.COMMUNICATE, scores.metrics, scores.wall_seconds, scores.answered)
        epsilon = None
        self.privacy_spent(epsilons)
        if epsilons is not None:
            epsilon = max(e for e in epsilons if e is not None)
        self.timing(round_, Phase.COMMUNICATE, scores.wall_seconds, epsilon=epsilon)
        chosen = set(scores.plan.chosen)
        self.note(round_, [n for i, n in enumerate(self.names) if i not in chosen], "sat out")
        self.note(round_, [self.names[i] for i in scores.late], "late")

    def note(self, round_: int, names: list[str], note: str, phase: Phase = Phase.COMMUNICATE) -> None:
        """Participants that sat a round out, were late, or were restarted."""
        for name in names:
            self._row(round_, name, phase, note=note)
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            self.say(f"round {round_:>3}: {shown} {note}")

    def safeguard(self, round_: int, who: list[int], revisits: list[dict]) -> None:
        """Participants whose safeguard (train.safeguard_holdout) undid this round's update:
        a note row whose accuracy is the held-out accuracy the round would have left."""
        for i, r in zip(who, revisits):
            if r.get("kept") is False:
                self._row(round_, self.names[i], Phase.REVISIT, accuracy=r["validation"], note=SAFEGUARD_NOTE)

    def events_of(self, round_: int, events: list[Event]) -> None:
        for event in events:
            self.note(round_, [event.participant], event.note, event.phase)

    def timing(self, round_: int, phase: Phase, wall_seconds: float, epsilon: float | None = None) -> None:
        """A whole phase's wall time on the driver (participant '*')."""
        self._row(round_, ALL, phase, wall_seconds=wall_seconds, epsilon=epsilon)

    def resume(self, round_: int) -> None:
        """Take back the rows of rounds up to `round_` from the run's metrics and drop the
        rest, part file by part file, so that what is on disk stays a whole prefix of the
        run whenever this stops."""
        self._clear()
        self.pending, self.current, self.parts = [], [], 0
        storage = self.storage
        if storage is None:
            return
        for part in storage.names(METRICS):
            if not (part.startswith("part-") and part.endswith(".parquet")):
                continue
            rows = pq.read_table(
                storage.path(METRICS, part), schema=SCHEMA, filesystem=storage.fs
            ).to_pylist()
            kept = [r for r in rows if r["round"] <= round_]
            if not kept:
                storage.delete(METRICS, part)
                continue
            if len(kept) < len(rows):
                storage.write_bytes(f"{METRICS}/{part}", _parquet(pa.Table.from_pylist(kept, schema=SCHEMA)))
            for r in kept:
                self._absorb(r)
            self.parts = max(self.parts, int(part[len("part-") : -len(".parquet")]) + 1)

    def end_round(self, round_: int, rounds: int) -> None:
        now = [r for r in self.current if r["round"] == round_]
        self.current = []
        acc = [r["accuracy"] for r in now if is_result(r, Phase.EVALUATE)]
        lower = self.lower
        gain = np.mean(acc) - np.mean(list(lower.values())) if lower and acc else float("nan")
        walls = {r["phase"]: r["wall_seconds"] for r in now if r["wall_seconds"] is not None}
        phases = " ".join(f"{p} {walls[p]:.1f}s" for p in ROUND_PHASES if p in walls)
        self.say(f"round {round_:>3}/{rounds}: {describe_accuracy(acc)}  gain {gain:+.3f}  [{phases}]")
        if self.trackers:
            scalars = round_scalars(now, lower)
            for tracker in self.trackers:
                tracker.log_round(round_, scalars)

    # ------------------------------------------------------------ reading back

    def table(self) -> pa.Table:
        """Every row so far: what is on disk, then what is not yet."""
        pending = pa.Table.from_pylist(self.pending, schema=SCHEMA)
        if self.storage is None or not self.storage.exists(METRICS):
            return pending
        written = pq.read_table(self.storage.path(METRICS), schema=SCHEMA, filesystem=self.storage.fs)
        return pa.concat_tables([written, pending]) if self.pending else written

    def summary(self) -> list[SummaryRow]:
        """Per participant: lower bound, FedMD final, last three rounds' mean and best,
        upper bound, gain."""
        params = {d["participant"]: d.get("parameters") for d in self.info}
        adversaries = {self.names[i] for i in self.config.sharing.adversaries}
        rows = []
        for name in self.models:
            lo = self.lower.get(name, float("nan"))
            by_round = sorted(self.accuracy.get(name, {}).items())
            n_params = params.get(name)
            moved = list(self.moved.get(name, {}).values())
            rows.append(
                SummaryRow(
                    participant=name,
                    model=self.models[name],
                    parameters=n_params,
                    adversary=name in adversaries,
                    lower_bound=lo,
                    fedmd_final=by_round[-1][1] if by_round else lo,
                    fedmd_best=max((acc for _, acc in by_round), default=lo),
                    fedmd_last3=float(np.mean([acc for _, acc in by_round[-3:]])) if by_round else lo,
                    upper_bound=self.upper.get(name, float("nan")),
                    gain=(by_round[-1][1] if by_round else lo) - lo,
                    bytes_per_round=float(np.mean(moved)) if moved else 0.0,
                    fedavg_bytes_per_round=2 * 4 * n_params if n_params else None,
                    epsilon=self.epsilons.get(name),
                )
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
        if self.storage is None or not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=SCHEMA)
        self.storage.write_bytes(f"{METRICS}/part-{self.parts:06d}.parquet", _parquet(table))
        self.parts += 1
        self.pending = []
        for tracker in self.trackers:
            tracker.flush()

    def failed(self, exc: BaseException) -> None:
        """A participant's own code raised: its traceback goes to error.txt, which the
        error's one line then names (the line says what failed; the file says where)."""
        if self.storage is None or not isinstance(exc, ParticipantError) or not exc.trace:
            return
        self.storage.write_text(ERROR, f"{exc}\n\n{exc.trace}")
        exc.trace_file = self.storage.location(ERROR)

    def finish(self, complete: bool) -> None:
        self.complete = complete
        if complete and self.storage is not None:
            self.storage.delete(ERROR)  # a resumed run that ended: the failure it resumed from is over
        self.flush()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.storage is None or not self.lower:
            return
        summary = self.summary()
        epsilon = self.epsilon()
        self._write_json(
            "summary.json",
            {
                "complete": complete,
                "participants": [r.to_dict() for r in summary],
                "mean": mean_row(summary),
                "epsilon": epsilon,
                "delta": self.config.sharing.delta if epsilon is not None else None,
            },
        )
        text = (
            render_summary(
                summary,
                self.config,
                complete,
                epsilon,
                self.together,
                self.mps,
                self.chance,
                self.public_samples,
            )
            + self._events()
        )
        self.storage.write_text("summary.md", text)
        try:
            figure = io.BytesIO()
            plot_accuracy(self.table(), summary, figure, self.config.name)
            self.storage.write_bytes("accuracy.png", figure.getvalue())
        except Exception as exc:  # a plotting problem must not lose the run's results
            self.say(f"(plot skipped: {exc})")
        self.say(f"results in {self.storage}/ (metrics.parquet, summary.md, accuracy.png)")


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def phase_walls(rows: list[dict]) -> dict[tuple[int, str], float]:
    """Wall seconds of each (round, phase), as the driver timed it (every participant row of
    a phase carries the same wall time; whole-phase rows have participant '*')."""
    return {(r["round"], r["phase"]): r["wall_seconds"] for r in rows if r["wall_seconds"] is not None}


def seconds_per_round(rows: list[dict]) -> float:
    """Mean wall seconds of a collaboration round (transfer learning and bounds excluded)."""
    walls = phase_walls(rows)
    once = (Phase.TRANSFER, Phase.UPPER_BOUND)
    rounds = {r for r, phase in walls if r >= 1 and phase not in once}
    total = sum(s for (r, phase), s in walls.items() if r >= 1 and phase not in once)
    return total / max(1, len(rounds))
