"""The authors' training details: mean-image scaling, early stopping of the private
training, the revisit optimiser kept from the private training, evaluation every k rounds."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from fedmd_ray import privacy
from fedmd_ray.backends.local import LocalBackend
from fedmd_ray.fedmd import participant_specs, run
from fedmd_ray.participant import prepare
from fedmd_ray.phases import Phase
from fedmd_ray.plans import sample_participants
from fedmd_ray.tasks import build_task


def test_mean_image_scaling_subtracts_each_datasets_own_mean():
    task = build_task(tiny_config(data={"scaling": "mean_image"}))
    pub = task.public_train.x.astype(np.float64).mean(axis=0) / 255
    assert task.public_mean.shape == task.image_shape
    np.testing.assert_allclose(task.public_mean, pub, atol=1e-6)
    private = np.concatenate([p.x for p in task.private_parts])
    assert not np.allclose(task.private_mean, task.public_mean)  # its own dataset's, not the public one
    assert task.private_mean.shape == private.shape[1:]
    x = task.public_train.x[:4]
    got = prepare(x, torch.device("cpu"), torch.from_numpy(task.public_mean))
    np.testing.assert_allclose(got.numpy(), x / 255.0 - task.public_mean, atol=1e-6)
    # without a mean: the symmetric [-1, 1] mapping
    assert float(prepare(np.array([[[[0, 255]]]], np.uint8), torch.device("cpu")).min()) == -1.0
    assert build_task(tiny_config()).public_mean is None


def test_private_training_stops_early_as_the_authors_keras_callback():
    config = tiny_config(train={"private_epochs": 40, "private_patience": 2, "private_min_delta": 0.5})
    task = build_task(config)
    backend = LocalBackend(config, task, participant_specs(config, task))
    results = backend.transfer()
    # An improvement of 0.5 in test accuracy never comes: each stops after 1 + patience epochs.
    assert [r["private_epochs"] for r in results] == [3, 3, 3]
    five = tiny_config(train={"private_epochs": 5})
    full = LocalBackend(five, task, participant_specs(five, task))
    assert [r["private_epochs"] for r in full.transfer()] == [5, 5, 5]


def test_the_revisit_continues_the_private_optimiser_of_transfer_learning():
    config = tiny_config()
    task = build_task(config)
    backend = LocalBackend(config, task, participant_specs(config, task))
    backend.transfer()
    p = backend.participants[0]
    steps = [s["step"] for s in p.private_opt.state_dict()["state"].values()]
    # 10 private epochs of 18 samples at batch 32: one Adam step each, kept for the revisit
    assert steps and all(float(s) == config.train.private_epochs for s in steps)
    p.revisit(1)
    steps = [s["step"] for s in p.private_opt.state_dict()["state"].values()]
    assert all(float(s) == config.train.private_epochs + 4 for s in steps)  # 18 samples at batch 5


def test_evaluation_every_k_rounds_and_after_the_last(out_dir):
    result = run(tiny_config(train={"rounds": 3, "evaluate_every": 2}), out_dir, progress=None)
    rows = result.metrics.to_pylist()
    rounds = sorted({r["round"] for r in rows if r["phase"] == Phase.EVALUATE})
    assert rounds == [2, 3]
    last = {r["participant"]: r["accuracy"] for r in rows if r["phase"] == Phase.EVALUATE and r["round"] == 3}
    for r in result.summary:  # measured, not missing: a float, and round 3's
        assert isinstance(r.fedmd_final, float) and not math.isnan(r.fedmd_final)
        assert r.fedmd_final == last[r.participant]


def test_metrics_are_written_a_part_per_round_and_read_back_whole(out_dir):
    result = run(tiny_config(train={"rounds": 3}), out_dir, progress=None)
    parts = sorted((out_dir / "metrics.parquet").glob("part-*.parquet"))
    assert len(parts) >= 4  # transfer learning, upper bound, three rounds (each its own part)
    on_disk = pq.read_table(out_dir / "metrics.parquet")
    assert on_disk.num_rows == result.metrics.num_rows
    assert on_disk.to_pylist() == result.metrics.to_pylist()
    # each part holds only its own rows: the last one is the last round's
    assert {r["round"] for r in pq.read_table(parts[-1]).to_pylist()} == {3}


def test_sitting_out_costs_no_evaluation_and_repeats_the_last_result(out_dir):
    config = tiny_config(train={"rounds": 3, "participation": 0.34})
    rows = run(config, out_dir, progress=None).metrics.to_pylist()
    evals = {
        (r["round"], r["participant"][:3]): r for r in rows if r["phase"] == Phase.EVALUATE and not r["note"]
    }
    for round_ in (2, 3):
        chosen = {f"p{i:02d}" for i in sample_participants(0, round_, 3, 0.34)}
        for name in ("p00", "p01", "p02"):
            row, before = evals[(round_, name)], evals[(round_ - 1, name)]
            if name not in chosen:
                assert row["accuracy"] == before["accuracy"] and row["seconds"] == 0.0
            else:
                assert row["seconds"] > 0


def test_epsilon_per_participant_counts_its_own_releases(out_dir):
    config = tiny_config(
        train={"rounds": 3, "participation": 0.34}, sharing={"clip": 5.0, "noise_multiplier": 2.0}
    )
    result = run(config, out_dir, progress=None)
    for i, row in enumerate(result.summary):
        releases = sum(i in sample_participants(0, r, 3, 0.34) for r in (1, 2, 3))
        assert row.epsilon == pytest.approx(privacy.epsilon(2.0, releases, 1e-5))
    assert max(r.epsilon for r in result.summary) == pytest.approx(
        next(r["epsilon"] for r in result.metrics.to_pylist()[::-1] if r["epsilon"] is not None)
    )
