"""What each collaboration round works on, drawn in one place: the public subset the
consensus is formed on (the paper's fresh 'alignment' draw per round) and who takes part.

A round's plan depends only on the config and the round number, so a resumed run, a
backend that starts on the next round early, and a rerun all draw the same plans."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SUBSET_STREAM = 0xA11
PARTICIPATION_STREAM = 0x5A


@dataclass(frozen=True)
class RoundPlan:
    round: int
    indices: np.ndarray = field(repr=False)
    """The round's public subset: indices into the public training data, sorted."""
    chosen: list[int]
    """The participants taking part (everyone, or a seeded sample)."""


def public_subset(
    rng: np.random.Generator, labels: np.ndarray, subset_size: int, stratified: bool = True
) -> np.ndarray:
    """A draw of `subset_size` public samples, sorted for locality. Stratified (the authors'
    StratifiedShuffleSplit): each class gets its share of the subset, rounded by largest
    remainder so the sizes add up."""
    n = len(labels)
    size = min(subset_size, n)
    if not stratified or size == n:
        return np.sort(rng.choice(n, size=size, replace=False))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = size * counts / n
    take = np.floor(quota).astype(np.int64)
    short = size - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    order = np.argsort(inverse, kind="stable")  # sample indices grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = [rng.choice(order[s : s + c], size=k, replace=False) for s, c, k in zip(starts, counts, take)]
    return np.sort(np.concatenate(chosen))


def sample_participants(seed: int, round_: int, n: int, fraction: float) -> list[int]:
    """Who takes part in round `round_`: everyone, or a seeded draw of round(fraction * n)."""
    if fraction >= 1:
        return list(range(n))
    k = max(1, round(fraction * n))
    rng = np.random.default_rng([seed, round_, PARTICIPATION_STREAM])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


class RoundPlans:
    """The plans of rounds 1..`rounds` for `participants` participants over public data
    labelled `public_labels`."""

    def __init__(
        self,
        seed: int,
        rounds: int,
        participants: int,
        public_labels: np.ndarray,
        subset_size: int,
        stratified: bool = True,
        participation: float = 1.0,
    ):
        self.seed, self.rounds, self.participants = seed, rounds, participants
        self.labels, self.subset_size, self.stratified = public_labels, subset_size, stratified
        self.participation = participation

    def __getitem__(self, round_: int) -> RoundPlan:
        if not 1 <= round_ <= self.rounds:
            raise IndexError(f"round {round_} is not in 1..{self.rounds}")
        rng = np.random.default_rng([self.seed, round_, SUBSET_STREAM])
        indices = public_subset(rng, self.labels, self.subset_size, self.stratified)
        chosen = sample_participants(self.seed, round_, self.participants, self.participation)
        return RoundPlan(round_, indices, chosen)

    def after(self, plan: RoundPlan) -> RoundPlan | None:
        """The next round's plan; None after the last round."""
        return self[plan.round + 1] if plan.round < self.rounds else None

    def releases(self, upto: int) -> np.ndarray:
        """How many times each participant has sent scores in rounds 1..`upto` (late ones
        included: their scores left them, used or not)."""
        counts = np.zeros(self.participants, dtype=np.int64)
        for round_ in range(1, upto + 1):
            counts[sample_participants(self.seed, round_, self.participants, self.participation)] += 1
        return counts
