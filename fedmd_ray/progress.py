"""What a person watches while a run works: which phase, which participants have finished,
where each long one is (epoch k of n, validation accuracy, early stop), and the time left.

Events come as small dicts from the backends (a phase starts: `phase_event`), from
`fedmd.run` (a round ends) and from the participants (directly on `local`, through a Ray
actor on `ray`):

  {"kind": "phase", "phase": "transfer", "round": 0, "participants": [...], "rounds": 20}
  {"kind": "phase", "phase": "digest + revisit + evaluate", "steps": ["digest", ...], ...}
  {"kind": "progress", "participant": "p03-cnn2", "phase": "transfer", "fraction": 0.4,
   "text": "public epoch 3/20, val 0.912"}
  {"kind": "done", "participant": "p03-cnn2", "phase": "transfer"}
  {"kind": "round", "round": 3, "rounds": 20}

A terminal gets a live display (rich); anything else (CI logs, `ray job submit`, a file)
gets plain lines, at most one per participant every `PLAIN_EVERY_SECONDS`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from fedmd_ray.phases import Phase

PLAIN_EVERY_SECONDS = 10.0
MAX_LIVE_ROWS = 12
MODES = ("auto", "live", "plain", "none")


def phase_event(phases: Sequence[str], round_: int, rounds: int, participants: list[str]) -> dict:
    """A phase starts for `participants` (several phases, when each participant takes them
    one after another without waiting for the others: its progress spans them all)."""
    event = {
        "kind": "phase",
        "phase": " + ".join(phases),
        "round": round_,
        "rounds": rounds,
        "participants": participants,
    }
    if len(phases) > 1:
        event["steps"] = [str(p) for p in phases]
    return event


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h12m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Turns events into lines or a live display. `say` prints a permanent line; `event`
    takes one event. Thread-safe: events may arrive from a backend's polling loop."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "live" if _is_terminal(self.stream) and _has_rich() else "plain"
        self.mode = mode
        self.lock = threading.Lock()
        self.phase_name = ""
        self.steps: list[str] = []
        self.round = 0
        self.rounds = 0
        self.names: list[str] = []
        self.fraction: dict[str, float] = {}
        self.text: dict[str, str] = {}
        self.done: set[str] = set()
        self.phase_start = time.perf_counter()
        self.run_start = time.perf_counter()
        self.first_round_start: float | None = None
        self.rounds_done = 0
        self.rounds_left = 0
        self.last_line: dict[str, float] = {}
        self.live: Any = None
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            self.console = Console(file=self.stream)
            self.live = Live(
                console=self.console, refresh_per_second=4, transient=True, get_renderable=self._render
            )
            self.live.start()

    # ------------------------------------------------------------ input

    def say(self, line: str) -> None:
        if self.mode == "none":
            return
        with self.lock:
            if self.live is not None:
                self.live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                print(line, file=self.stream, flush=True)

    def event(self, event: dict) -> None:
        if self.mode == "none":
            return
        kind = event.get("kind")
        with self.lock:
            if kind == "phase":
                self._start_phase(event)
            elif kind == "round":
                self.rounds_done += 1
                self.rounds_left = event["rounds"] - event["round"]
            elif kind in ("progress", "done") and event.get("phase") in self.steps:
                name = event["participant"]
                # Steps run together: a participant is done after the last, part-way before.
                step = self.steps.index(event["phase"])
                if kind == "done" and step == len(self.steps) - 1:
                    self.done.add(name)
                    self.fraction[name] = 1.0
                else:
                    part = 1.0 if kind == "done" else float(event.get("fraction", 0))
                    share = (step + part) / len(self.steps)
                    self.fraction[name] = max(self.fraction.get(name, 0.0), share)
                    self.text[name] = event.get("text", "")
                if self.live is None:
                    self._plain(name, kind)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    # ------------------------------------------------------------ state

    def _start_phase(self, event: dict) -> None:
        self.phase_name = event["phase"]
        self.steps = list(event.get("steps") or [self.phase_name])
        self.round = event.get("round", self.round)
        self.rounds = event.get("rounds", self.rounds)
        self.names = list(event.get("participants", []))
        self.fraction = dict.fromkeys(self.names, 0.0)
        self.text, self.done = {}, set()
        self.phase_start = time.perf_counter()
        if self.round >= 1 and self.first_round_start is None:
            self.first_round_start = self.phase_start

    def _phase_left(self) -> float | None:
        """Seconds left in this phase, from its share done so far."""
        if not self.names:
            return None
        share = sum(self.fraction.get(n, 0.0) for n in self.names) / len(self.names)
        elapsed = time.perf_counter() - self.phase_start
        if share <= 0.02 or elapsed < 2:
            return None
        return elapsed * (1 - share) / share

    def _run_left(self) -> float | None:
        """Seconds left in the run, from the rounds done so far (once one has finished)."""
        if self.first_round_start is None or self.rounds_done < 1:
            return None
        per_round = (time.perf_counter() - self.first_round_start) / self.rounds_done
        # The round under way is partly done; count it whole, an estimate errs long.
        return per_round * self.rounds_left

    def _title(self) -> str:
        where = (
            f"round {self.round}/{self.rounds} {self.phase_name}"
            if self.round
            else self.phase_name.replace("_", " ")
        )
        parts = [f"{where}: {len(self.done)}/{len(self.names)} participants done"]
        left = self._phase_left()
        if left is not None:
            parts.append(f"phase eta {duration(left)}")
        run_left = self._run_left()
        if run_left is not None:
            parts.append(f"run eta {duration(run_left)}")
        parts.append(f"elapsed {duration(time.perf_counter() - self.run_start)}")
        return ", ".join(parts)

    # ------------------------------------------------------------ output

    def _plain(self, name: str, kind: str) -> None:
        """A line for a participant's progress, at most every PLAIN_EVERY_SECONDS; in long
        phases every participant's finish too, while there are few participants."""
        now = time.perf_counter()
        few = len(self.names) <= 20 and self.phase_name in (Phase.TRANSFER, Phase.UPPER_BOUND)
        if kind == "done" and few:
            print(f"  {name} done ({self._title()})", file=self.stream, flush=True)
            return
        key = name if kind == "progress" and few else "*"
        if now - self.last_line.get(key, self.phase_start) < PLAIN_EVERY_SECONDS:
            return
        self.last_line[key] = now
        if key == "*":
            print(f"  {self._title()}", file=self.stream, flush=True)
        else:
            print(f"  {name}: {self.text.get(name, '')}", file=self.stream, flush=True)

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        with self.lock:
            table = Table.grid(padding=(0, 1))
            table.add_row(self._title())
            running = [n for n in self.names if n not in self.done]
            shown = running[:MAX_LIVE_ROWS]
            if shown:
                rows = Table.grid(padding=(0, 1))
                for name in shown:
                    bar = ProgressBar(total=1.0, completed=self.fraction.get(name, 0.0), width=24)
                    rows.add_row(f"  {name}", bar, self.text.get(name, ""))
                table.add_row(rows)
            if len(running) > len(shown):
                table.add_row(f"  ... and {len(running) - len(shown)} more running")
            return table


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
