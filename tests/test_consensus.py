import numpy as np
import pytest

from fedmd_ray.consensus import aggregate
from fedmd_ray.errors import ConsensusError


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(5)]


def test_mean_is_the_average(scores):
    np.testing.assert_allclose(aggregate(scores, "mean"), np.mean(scores, axis=0), rtol=1e-6)


def test_weighted_mean(scores):
    w = [1, 0, 0, 0, 3]
    expected = (scores[0] + 3 * scores[4]) / 4
    np.testing.assert_allclose(aggregate(scores, "weighted", w), expected, rtol=1e-6)
    np.testing.assert_allclose(aggregate(scores, "weighted", [2] * 5), aggregate(scores, "mean"), rtol=1e-6)
    with pytest.raises(ConsensusError, match="non-negative"):
        aggregate(scores, "weighted", [-1, 1, 1, 1, 1])


def test_median_and_trimmed_mean_ignore_one_outlier(scores):
    honest = aggregate(scores[:4], "median")
    attacked = [*scores[:4], np.full((5, 4), 1e6, dtype=np.float32)]
    assert np.abs(aggregate(attacked, "median")).max() < 10
    assert np.abs(aggregate(attacked, "trimmed_mean")).max() < 10
    assert np.abs(aggregate(attacked, "mean")).max() > 1e5
    # Median of five values with an extreme one is the 3rd smallest of the rest-plus-outlier.
    stacked = np.sort(np.stack(attacked), axis=0)
    np.testing.assert_allclose(aggregate(attacked, "median"), stacked[2])
    np.testing.assert_allclose(aggregate(attacked, "trimmed_mean"), stacked[1:4].mean(axis=0), rtol=1e-6)
    assert honest.shape == (5, 4)


def test_ties_are_exact():
    same = [np.ones((2, 3), np.float32)] * 4
    for method in ("mean", "median", "trimmed_mean", "weighted"):
        np.testing.assert_array_equal(aggregate(same, method), np.ones((2, 3)))


def test_bad_scores_are_rejected_with_the_participant_named(scores):
    broken = list(scores)
    broken[2] = broken[2].copy()
    broken[2][0, 0] = np.nan
    with pytest.raises(ConsensusError, match="p2 sent NaN or infinite"):
        aggregate(broken, "mean", names=[f"p{i}" for i in range(5)])
    broken[2][0, 0] = np.inf
    with pytest.raises(ConsensusError, match="NaN or infinite"):
        aggregate(broken, "median")
    with pytest.raises(ConsensusError, match="shape"):
        aggregate([scores[0], scores[1][:3]], "mean")
    with pytest.raises(ConsensusError, match="No scores"):
        aggregate([], "mean")
    with pytest.raises(ConsensusError, match="Unknown consensus"):
        aggregate(scores, "mode")
