"""The safeguard (train.safeguard_holdout): a participant validates each round's update on
private samples it held out, and goes back to its model from before the round when the
update made it worse there, saying so in the metrics. The test set is never looked at."""

import numpy as np
import pytest

from fedmd_ray import run
from fedmd_ray.participant import holdout_split
from fedmd_ray.results import SAFEGUARD_NOTE
from tests.conftest import numbers, tiny_config


def test_the_holdout_takes_some_of_each_class_and_is_seeded():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])  # class 3 has one sample: never held out
    train, held = holdout_split(labels, 0.34, seed=7, index=2)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=4).tolist() == [1, 1, 1, 0]
    assert held.tolist() == holdout_split(labels, 0.34, seed=7, index=2)[1].tolist()
    others = {tuple(holdout_split(labels, 0.34, seed=7, index=i)[1]) for i in range(8)}
    assert len(others) > 1  # each participant draws its own
    assert len(holdout_split(labels, 0.0, seed=7, index=2)[1]) == 0


@pytest.fixture
def harmful(tmp_path, monkeypatch):
    """A consensus of large noise: digesting it wrecks a model, so the safeguard must act."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "agg.py").write_text(
        "import numpy as np\n\n\ndef noise(scores, weights=None):\n"
        "    return np.random.default_rng(0).normal(0, 50, scores.shape[1:]).astype(scores.dtype)\n"
    )
    return {"consensus": "agg.py:noise", "digest_epochs": 3, "rounds": 2}


def _accuracy(rows, round_, participant):
    phase = "transfer" if round_ == 0 else "evaluate"
    (row,) = [
        r
        for r in rows
        if (r["round"], r["participant"], r["phase"], r["note"]) == (round_, participant, phase, None)
    ]
    return row["accuracy"]


def test_a_round_that_makes_a_participant_worse_is_undone_and_said(ray_session, harmful):
    guarded = run(tiny_config(train={**harmful, "safeguard_holdout": 0.34}), progress=None)
    rows = guarded.metrics.to_pylist()
    undone = [(r["round"], r["participant"]) for r in rows if r["note"] == SAFEGUARD_NOTE]
    assert undone, "the noise consensus should have made somebody worse on its held-out samples"
    for round_, who in undone:
        # Back to the model from before the round: the same test accuracy as then, exactly.
        assert _accuracy(rows, round_, who) == _accuracy(rows, round_ - 1, who)
    unguarded = run(tiny_config(train=harmful), progress=None).metrics.to_pylist()
    assert any(_accuracy(unguarded, r, w) != _accuracy(rows, r, w) for r, w in undone)
    # The same numbers, notes included, with the participants on Ray actors.
    on_ray = run(
        tiny_config(train={**harmful, "safeguard_holdout": 0.34}, resources={"backend": "ray"}), progress=None
    ).metrics.to_pylist()
    assert numbers(on_ray) == numbers(rows)
    assert [(r["round"], r["participant"]) for r in on_ray if r["note"] == SAFEGUARD_NOTE] == undone


def test_without_the_option_nothing_is_held_out_and_nothing_undone(harmful):
    rows = run(tiny_config(train=harmful), progress=None).metrics.to_pylist()
    assert not any(r["note"] == SAFEGUARD_NOTE for r in rows)
