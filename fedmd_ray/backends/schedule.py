"""How participants' calls share one machine's cores, chosen per kind of call from what the
calls measurably cost.

Two ways to run a phase of N participants on C cores:

- spread: C participants at once, one torch thread each;
- stack: one participant at a time on all C threads, as the sequential loop does.

Neither wins everywhere, and which wins depends on the machine. On a 2-core Intel VM a
paper CNN's digest (batches of 32 public images) took 1.87 s per participant when two
single-threaded actors ran side by side (the cores share caches and memory bandwidth) and
0.65 s alone on two threads, so stacking was faster there; on a 2-core AMD EPYC VM the same
digest ran 0.95 s a participant spread against 1.21 s stacked. A revisit (batches of 5
private images) spends its time in per-step overheads that threads do not split, and
spreading wins on both. So the schedule measures. The first round of each round phase is
spread and not measured: each actor's first digest ran ~1.5x slower than its later ones
(an actor is a process of its own, warming up alone), and a probe taken then would count
that against the way it ran. In the second round a few probes (participants spread over
the range of costs) run stacked, alone on the cores, and everyone else spread; in the third
the probes run spread with everyone; from the fourth on the phase runs the way that was
faster for the same participants. Spread is the way it starts from because it is what one
actor per core does anyway, so the probing costs only the probes' stacked calls.

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
    planned: int = 0
    """Calls of this kind planned so far (rounds, for a round phase)."""

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

    def plan(self, method: str, who: list[int], cost: dict[int, float] | None = None) -> list[Segment]:
        """The segments, in order, that run `who`'s `method` calls. `cost`: each
        participant's seconds in an earlier call, to choose probes across the range."""
        if self.policy != "auto" or method not in ROUND_METHODS:
            return [self._segment(STACK if self.policy == STACK else SPREAD, who)]
        c = self.costs.setdefault(method, _Costs())
        if c.chosen is None and len(self._pairs(c)) >= self.probes:
            c.chosen = self._choose(c)
        if c.chosen is not None:
            return [self._segment(c.chosen, who)]
        c.planned += 1
        if c.planned == 1:
            return [self._segment(SPREAD, who)]  # the warm-up: recorded, then forgotten
        if c.planned == 2:
            c.spread.clear()
        # Probes measured stacked and not yet spread are spread in this call (with everyone
        # else), which pairs them; only the shortfall is made up with new probes.
        here = set(who)
        waiting = [i for i in c.stack if i not in c.spread and i in here]
        want = self.probes - len(self._pairs(c)) - len(waiting)
        candidates = [i for i in who if i not in c.stack]
        if want <= 0 or len(candidates) <= want:  # nobody to probe beside: spread, measured
            return [self._segment(SPREAD, who)]
        probes = self._probes(candidates, want, cost or {})
        probed = set(probes)
        rest = [i for i in who if i not in probed]
        # Stacked first, each call alone on the cores; then everyone else spread.
        return [self._segment(STACK, probes), self._segment(SPREAD, rest)]

    @staticmethod
    def _probes(candidates: list[int], want: int, cost: dict[int, float]) -> list[int]:
        """`want` of `candidates` at evenly spaced ranks of cost: neither only the cheapest
        (whose calls are mostly overhead) nor only the dearest (the most to lose)."""
        ranked = sorted(candidates, key=lambda i: (cost.get(i, 0.0), i))
        return sorted(ranked[int((k + 0.5) * len(ranked) / want)] for k in range(want))

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
