import numpy as np
import pytest

from fedmd_ray import partition
from fedmd_ray.errors import PartitionError

LABELS = np.repeat(np.arange(6), 50)


def _disjoint(parts):
    joined = np.concatenate(parts)
    return len(joined) == len(np.unique(joined))


def test_per_class_gives_every_participant_n_of_each_class():
    parts = partition.per_class(LABELS, participants=10, samples_per_class=3, seed=0)
    assert len(parts) == 10 and _disjoint(parts)
    for p in parts:
        classes, counts = np.unique(LABELS[p], return_counts=True)
        assert classes.tolist() == list(range(6)) and counts.tolist() == [3] * 6
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition.per_class(LABELS, 10, 3, 0)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in partition.per_class(LABELS, 10, 3, 1)]


def test_per_class_says_when_a_class_is_short():
    with pytest.raises(PartitionError, match="Class 0 has 50 private samples but 20 participants x 3"):
        partition.per_class(LABELS, participants=20, samples_per_class=3, seed=0)


def test_iid_sizes_and_errors():
    parts = partition.iid(LABELS, participants=4, samples_per_participant=70, seed=0)
    assert [len(p) for p in parts] == [70] * 4 and _disjoint(parts)
    with pytest.raises(PartitionError, match="cannot give 4 participants 100 each"):
        partition.iid(LABELS, 4, 100, 0)


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(6), 500)
    skewed = partition.dirichlet(labels, 5, 40, alpha=0.05, seed=0)
    even = partition.dirichlet(labels, 5, 40, alpha=100.0, seed=0)
    assert all(len(p) == 40 for p in skewed + even) and _disjoint(skewed)
    n_classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert n_classes(skewed) < 3 < n_classes(even)


def test_report_counts():
    parts = partition.per_class(LABELS, 2, 2, 0)
    rows = partition.report(LABELS, parts, ["a", "b"])
    assert rows[0] == {
        "participant": "a",
        "samples": 12,
        "classes": list(range(6)),
        "per_class": {c: 2 for c in range(6)},
    }


def test_dirichlet_fills_from_other_classes_and_says_when_empty():
    parts = partition.dirichlet(LABELS, 5, 60, alpha=0.05, seed=0)
    assert all(len(p) == 60 for p in parts) and _disjoint(parts)
    with pytest.raises(PartitionError, match="Ran out of private samples"):
        partition.dirichlet(LABELS, 5, 70, alpha=1.0, seed=0)


def test_by_writer_gives_each_participant_one_whole_writer():
    writers = np.repeat(np.arange(12), 25)  # 12 writers, 25 samples each
    writers[:25] = 99  # ... one of them merged into another id
    labels = np.tile(np.arange(5), 60)
    parts = partition.by_writer(labels, writers, participants=5, min_samples=20, seed=0)
    assert _disjoint(parts)
    for p in parts:
        assert len(np.unique(writers[p])) == 1
        assert len(p) == np.sum(writers == writers[p][0])
    with pytest.raises(PartitionError, match="Only 0 writers have at least 100"):
        partition.by_writer(labels, writers, 5, 100, 0)


def test_one_subclass_per_superclass():
    sub = np.repeat(np.arange(12), 40)  # 12 subclasses ...
    sup = sub // 3  # ... in 4 superclasses of 3
    parts = partition.one_subclass_per_class(sup, sub, participants=6, samples_per_class=5, seed=0)
    assert _disjoint(parts)
    for p in parts:
        assert sorted(np.unique(sup[p])) == [0, 1, 2, 3]
        assert len(np.unique(sub[p])) == 4 and len(p) == 20  # one subclass each, 5 samples
    # participant i holds subclass i % 3 of each superclass: all 12 covered, twice each
    for i, p in enumerate(parts):
        assert sorted(np.unique(sub[p]).tolist()) == [3 * c + i % 3 for c in range(4)]
    with pytest.raises(PartitionError, match="Lower partition.samples_per_class"):
        partition.one_subclass_per_class(sup, sub, participants=30, samples_per_class=20, seed=0)
