"""Splitting the private data among participants: the paper's per-class draw, iid, Dirichlet.

Every partition is disjoint (no sample is held by two participants) and seeded.
"""

from __future__ import annotations

import numpy as np

from fedmd_ray.errors import PartitionError


def per_class(labels: np.ndarray, participants: int, samples_per_class: int, seed: int) -> list[np.ndarray]:
    """The paper's split: each participant gets `samples_per_class` samples of every class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts: list[list[np.ndarray]] = [[] for _ in range(participants)]
    need = participants * samples_per_class
    for c in classes:
        pool = rng.permutation(np.flatnonzero(labels == c))
        if len(pool) < need:
            raise PartitionError(
                f"Class {c} has {len(pool)} private samples but {participants} participants x "
                f"{samples_per_class} per class need {need}. Lower partition.samples_per_class "
                "or the number of participants."
            )
        for p in range(participants):
            parts[p].append(pool[p * samples_per_class : (p + 1) * samples_per_class])
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def iid(labels: np.ndarray, participants: int, samples_per_participant: int, seed: int) -> list[np.ndarray]:
    """Uniformly random disjoint shards of equal size."""
    need = participants * samples_per_participant
    if len(labels) < need:
        raise PartitionError(
            f"{len(labels)} private samples cannot give {participants} participants "
            f"{samples_per_participant} each ({need}). Lower partition.samples_per_participant."
        )
    order = np.random.default_rng(seed).permutation(len(labels))[:need]
    return [np.sort(chunk) for chunk in np.split(order, participants)]


def dirichlet(
    labels: np.ndarray, participants: int, samples_per_participant: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew: participant p's class mix is drawn from Dirichlet(alpha); small alpha means
    few classes each. Samples are drawn without replacement from shared per-class pools."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    parts = []
    for p in range(participants):
        mix = rng.dirichlet(np.full(len(classes), alpha))
        counts = rng.multinomial(samples_per_participant, mix)
        chosen = []
        for c, k in zip(classes, counts):
            # A class that runs dry gives what it has; the rest comes from the fullest classes.
            take = min(k, len(pools[c]))
            chosen += [pools[c].pop() for _ in range(take)]
        while len(chosen) < samples_per_participant:
            fullest = max(pools, key=lambda c: len(pools[c]))
            if not pools[fullest]:
                raise PartitionError(
                    f"Ran out of private samples at participant {p}; lower partition.samples_per_participant."
                )
            chosen.append(pools[fullest].pop())
        parts.append(np.sort(np.asarray(chosen, dtype=np.int64)))
    return parts


def by_writer(
    labels: np.ndarray, writers: np.ndarray, participants: int, min_samples: int, seed: int
) -> list[np.ndarray]:
    """The paper's imbalanced FEMNIST: each participant holds every sample of one writer.
    Writers with fewer than `min_samples` samples (of the private classes) are not drawn."""
    ids, counts = np.unique(writers, return_counts=True)
    eligible = ids[counts >= min_samples]
    if len(eligible) < participants:
        raise PartitionError(
            f"Only {len(eligible)} writers have at least {min_samples} private samples; "
            f"{participants} participants need one each. Lower partition.min_writer_samples."
        )
    chosen = np.random.default_rng(seed).choice(eligible, size=participants, replace=False)
    return [np.flatnonzero(writers == w) for w in chosen]


def one_subclass_per_class(
    labels: np.ndarray, subclasses: np.ndarray, participants: int, samples_per_class: int, seed: int
) -> list[np.ndarray]:
    """The paper's imbalanced CIFAR: the task is the superclass (`labels`), and participant
    p sees subclass p % k of each superclass (its k subclasses in ascending order), as the
    authors' code assigns them: with 10 participants and CIFAR-100's 5 subclasses, every
    subclass is held by two participants and none is left out. `samples_per_class` of it,
    drawn at random (two participants sharing a subclass get different samples)."""
    rng = np.random.default_rng(seed)
    pools = {s: list(rng.permutation(np.flatnonzero(subclasses == s))) for s in np.unique(subclasses)}
    parts = []
    for p in range(participants):
        chosen = []
        for c in np.unique(labels):
            options = np.unique(subclasses[labels == c])
            sub = options[p % len(options)]
            if len(pools[sub]) < samples_per_class:
                raise PartitionError(
                    f"Subclass {sub} (of class {c}) has {len(pools[sub])} samples left for participant "
                    f"{p}, who needs {samples_per_class}. Lower partition.samples_per_class."
                )
            chosen += [pools[sub].pop() for _ in range(samples_per_class)]
        parts.append(np.sort(np.asarray(chosen, dtype=np.int64)))
    return parts


def report(labels: np.ndarray, parts: list[np.ndarray], names: list[str]) -> list[dict]:
    """One row per participant: how many samples, of which classes."""
    rows = []
    for name, index in zip(names, parts):
        classes, counts = np.unique(labels[index], return_counts=True)
        rows.append(
            {
                "participant": name,
                "samples": int(len(index)),
                "classes": [int(c) for c in classes],
                "per_class": {int(c): int(k) for c, k in zip(classes, counts)},
            }
        )
    return rows
