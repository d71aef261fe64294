"""What the algorithm (`fedmd.py`) and the backends that run participants say to each other:
a small typed interface, so the algorithm never learns how or where participants run.

A backend runs the FedMD steps for the participants a round plan names, and hands back
metrics (plain dicts of numbers, one per participant) and opaque handles: the scores that
left the participants and the consensus, which the algorithm passes on without reading
(arrays for `local`, object refs for `ray`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedmd_ray.phases import Phase
from fedmd_ray.plans import RoundPlan
from fedmd_ray.storage import Storage
from fedmd_ray.usercode import Code


@dataclass
class Scores:
    """A round's communicate: who sent scores in time, and what they sent."""

    plan: RoundPlan
    answered: list[int]
    late: list[int]
    """Chosen participants whose scores missed the consensus (resources.deadline_s)."""
    payloads: list[Any] = field(repr=False)
    """Per answered participant, its scores as they left it. `aggregate` releases them."""
    metrics: list[dict]
    """Per answered participant: seconds computing, bytes_sent."""
    wall_seconds: float


@dataclass
class Updates:
    """A round's digest, revisit and evaluation: per participant metrics, in the order of
    the round's answered participants (digest, revisit) and of `evaluate` (evaluate)."""

    digest: list[dict]
    revisit: list[dict]
    evaluate: list[dict]
    walls: dict[Phase, float]
    """Each phase's wall seconds on the driver."""


@dataclass(frozen=True)
class Event:
    """Something that happened to a participant, recorded as a metrics row's `note`."""

    participant: str
    phase: str
    note: str


@dataclass(frozen=True)
class ConsensusPlan:
    """How scores become the consensus: the method, its weights and options, the dtype it
    travels back in."""

    method: str
    function: Any = None
    """A consensus a program registered (carried to the actors); None: found by name."""
    weights: list[float] | None = None
    """Per participant (all of them, by index); None: the method needs none."""
    options: dict[str, float] = field(default_factory=dict)
    dtype: str = "float32"
    code: Code | None = None
    """Where shipped user code is, inside an actor (set by the Ray backend)."""

    def among(self, answered: Sequence[int]) -> ConsensusPlan:
        """The plan for the scores of `answered` only."""
        if self.weights is None:
            return self
        return dataclasses.replace(self, weights=[self.weights[i] for i in answered])


@dataclass(frozen=True)
class AggregatorStatus:
    """What the consensus actor tells the driver: the consensus is formed (its bytes), or
    why not: a participant's scores failed to arrive (`participant` names it), or the
    consensus itself could not be formed (`participant` is None)."""

    bytes: int = 0
    error: str | None = None
    participant: str | None = None
    lost: bool = False
    """The participant's scores went with its node (actors.lost)."""


class Backend(Protocol):
    """Where participants run: `local` (this process) or `ray` (actors)."""

    name: str
    placement: dict | None
    """Where each actor runs (None for the local backend)."""
    threads: int
    """Torch threads of every participant (part of what decides the numbers)."""

    def describe(self) -> list[dict]: ...

    def transfer(self) -> list[dict]:
        """Transfer learning for everyone: public, then private data (the lower bound)."""

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]: ...

    def communicate(self, plan: RoundPlan) -> Scores:
        """The chosen participants' scores on the round's public subset."""

    def aggregate(self, scores: Scores, plan: ConsensusPlan) -> Any:
        """The consensus of `scores` (a handle), releasing the scores."""

    def update(
        self, scores: Scores, consensus: Any, evaluate: Sequence[int], upcoming: RoundPlan | None
    ) -> Updates:
        """Digest (on the scores' public subset) and revisit for those who answered, then
        evaluate `evaluate`. `upcoming` is the next round's plan: a backend may start on its
        scores already."""

    def end_round(self, round_: int, busy: Sequence[int] = ()) -> list[Event]:
        """Keep what a restart needs; what happened this round (restarts, ...)."""

    def save(self, storage: Storage, folder: str) -> dict[str, dict]:
        """Every participant's state into `folder` of `storage`: name -> file, sha256, bytes."""

    def restore(self, storage: Storage, folder: str, entries: dict[str, dict]) -> None: ...

    def shutdown(self) -> None: ...
