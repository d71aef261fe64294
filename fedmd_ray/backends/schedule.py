"""How participants' calls share one machine's cores, chosen per kind of call from what the
calls measurably cost.

Two ways to run a phase of N participants on C cores:

- spread: C participants at once, one torch thread each;
- stack: one participant at a time on all C threads, as the sequential loop does.

Neither wins everywhere. Measured on a 2-core VM: a paper CNN's digest (batches of 32-64
public images) took 1.87 s per participant when two single-threaded actors ran side by side
(the cores share caches and memory bandwidth) and 0.65 s alone on two threads, so stacking
is faster there; a revisit (batches of 5 private images) spends its time in per-step
overheads that threads do not split, and spreading is faster. So in its first rounds the
schedule runs a few participants of each round phase stacked and the rest spread, compares
the same participants' seconds both ways, and from then on runs the phase the faster way.
Until then it guesses from the phase's batch size, and only the probes run the other way.

The choice changes torch's thread count, and with it the floating-point rounding of
gradients; runs that must repeat bit for bit pin `resources.torch_threads` (or
`resources.schedule`), which fixes the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPREAD, STACK = "spread", "stack"

ROUND_METHODS = frozenset({"logits", "digest", "revisit", "evaluate"})
"""Calls repeated every round: worth measuring both ways. The rest run once (transfer
learning, checkpoints) and are spread."""


@dataclass
class Segment:
    """Participants run one way: `window` at once, `threads` torch threads each."""

    mode: str
    who: list[int]
    window: int
    threads: int


@dataclass
class _Costs:
    spread: dict[int, float] = field(default_factory=dict)
    stack: dict[int, float] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)
    """Seconds each stacked call took beyond the participant's own work (the round trip)."""
    chosen: str | None = None
    told: bool = False

    @property
    def gap(self) -> float:
        return sum(self.gaps) / len(self.gaps) if self.gaps else 0.0


class Schedule:
    """Per call kind, spread or stack: fixed by `policy` ('spread' or 'stack'), or with
    'auto' measured on `probes` participants per round until that many have run both ways."""

    def __init__(self, policy: str, cores: int, probes: int | None = None):
        self.policy, self.cores = policy, max(1, cores)
        self.probes = probes or self.cores
        self.costs: dict[str, _Costs] = {}

    def way(self, mode: str) -> tuple[int, int]:
        """(window, threads) of `mode`."""
        return (1, self.cores) if mode == STACK else (self.cores, 1)

    def _segment(self, mode: str, who: list[int]) -> Segment:
        return Segment(mode, who, *self.way(mode))

    def plan(self, method: str, who: list[int], batch: int = 0) -> list[Segment]:
        """The segments, in order, that run `who`'s `method` calls, whose batches hold
        `batch` samples (the first guess, until measured)."""
        if self.policy != "auto" or method not in ROUND_METHODS:
            return [self._segment(STACK if self.policy == STACK else SPREAD, who)]
        c = self.costs.setdefault(method, _Costs())
        if c.chosen is None and len(self._pairs(c)) >= self.probes:
            c.chosen = self._choose(c)
        if c.chosen is not None:
            return [self._segment(c.chosen, who)]
        guess = self.guess(batch)
        other = SPREAD if guess == STACK else STACK
        # Probe: a few participants run the other way, the rest the guessed way. Those
        # already measured the guessed way go first, so that a participant's seconds both
        # ways compare like with like; in the first round, the last ones.
        tried = c.stack if other == STACK else c.spread
        done = c.spread if other == STACK else c.stack
        untried = [i for i in who if i not in tried]
        want = self.probes - len(self._pairs(c))
        probes = [i for i in untried if i in done][:want] or untried[-want:]
        if len(probes) >= len(who):  # nobody left beside them: learn the guessed way first
            return [self._segment(guess, who)]
        rest = [i for i in who if i not in set(probes)]
        by_mode = {guess: rest, other: probes}
        # Spread first, then stacked, each stacked call alone on the cores.
        return [self._segment(m, by_mode[m]) for m in (SPREAD, STACK)]

    def guess(self, batch: int) -> str:
        """Before measuring: threads split a batch well when each gets a good share of it
        (16 samples or more); small batches are per-step overhead that threads do not split."""
        return STACK if batch >= 16 * self.cores else SPREAD

    def record(self, method: str, mode: str, index: int, seconds: float, wall: float) -> None:
        """Participant `index`'s `method` call ran `mode` for `seconds` of its own work and
        `wall` seconds from the driver's sending it to the driver's seeing its answer."""
        if method not in ROUND_METHODS or self.policy != "auto":
            return
        c = self.costs.setdefault(method, _Costs())
        if mode == STACK:
            c.stack[index] = seconds
            # Stacked calls run back to back, so each one's round trip is the cores' idle time.
            c.gaps = [*c.gaps[-31:], max(0.0, wall - seconds)]
        else:
            c.spread[index] = seconds

    @staticmethod
    def _pairs(c: _Costs) -> list[int]:
        return [i for i in c.stack if i in c.spread]

    def _choose(self, c: _Costs) -> str:
        pairs = self._pairs(c)
        return STACK if self._stacked(c, pairs) < self._spread(c, pairs) else SPREAD

    def _stacked(self, c: _Costs, pairs: list[int]) -> float:
        return sum(c.stack[i] + c.gap for i in pairs)

    def _spread(self, c: _Costs, pairs: list[int]) -> float:
        return sum(c.spread[i] for i in pairs) / self.cores

    def news(self, method: str) -> str | None:
        """Once, when `method`'s way has just been decided: a line saying which and why."""
        c = self.costs.get(method)
        if c is None or c.chosen is None or c.told:
            return None
        c.told = True
        pairs = self._pairs(c)
        n = len(pairs)
        stacked, spread = self._stacked(c, pairs) / n, self._spread(c, pairs) / n
        how = (
            f"one participant at a time on {self.cores} threads"
            if c.chosen == STACK
            else f"{self.cores} participants at once on one thread each"
        )
        return (
            f"schedule: {method} runs {how} (measured on {n} participants: {stacked:.3f} s a "
            f"participant stacked, {spread:.3f} s spread)"
        )
