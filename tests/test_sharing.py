"""What leaves a participant: payload encodings, clipping and noise, attacks; and end to end,
the bytes counted, robustness of median/trimmed mean, and what reaches the driver."""

import numpy as np
import pytest

from fedmd_ray import run, sharing
from fedmd_ray.consensus import aggregate, era
from fedmd_ray.errors import ParticipantError
from fedmd_ray.models import build_model
from fedmd_ray.phases import Phase
from tests.conftest import tiny_config

RNG = np.random.default_rng(0)
SCORES = RNG.normal(size=(50, 16)).astype(np.float32)


def test_payload_round_trips_and_sizes():
    assert sharing.nbytes(sharing.encode(SCORES, "float32", 3)) == 50 * 16 * 4
    half = sharing.encode(SCORES, "float16", 3)
    assert sharing.nbytes(half) == 50 * 16 * 2
    np.testing.assert_allclose(sharing.decode(half), SCORES, atol=2e-3)
    top = sharing.encode(SCORES, "topk", 3)
    assert sharing.nbytes(top) == 50 * 3 * (4 + 2)
    dense = sharing.decode(top)
    # The top-3 classes keep their scores; every other class sits at the smallest of them.
    top3 = np.argsort(-SCORES, axis=1)[:, :3]
    np.testing.assert_array_equal(np.take_along_axis(dense, top3, 1), np.take_along_axis(SCORES, top3, 1))
    floor = np.take_along_axis(SCORES, top3, 1).min(axis=1, keepdims=True)
    assert np.all(dense <= np.maximum(dense, floor)) and np.all(dense >= floor - 1e-6)


def test_clipping_bounds_every_row_and_noise_has_the_promised_scale():
    clipped = sharing.privatise(SCORES * 10, clip=1.0, noise_multiplier=0.0, rng=RNG)
    assert np.linalg.norm(clipped, axis=1).max() <= 1.0 + 1e-5
    small = SCORES * 1e-3
    np.testing.assert_allclose(sharing.privatise(small, 1.0, 0.0, RNG), small, rtol=1e-6)
    big = np.zeros((400, 16), np.float32)
    noisy = sharing.privatise(big, clip=0.5, noise_multiplier=0.25, rng=np.random.default_rng(1))
    expected_std = 0.25 * 2 * 0.5 * np.sqrt(400)
    assert noisy.std() == pytest.approx(expected_std, rel=0.05)


def test_attacks():
    flipped = sharing.corrupt(SCORES, "label_flip", 1.0, RNG)
    np.testing.assert_array_equal(flipped.argmax(1), 15 - SCORES.argmax(1))
    np.testing.assert_allclose(sharing.corrupt(SCORES, "scaled", 10.0, RNG), -10 * SCORES)
    noise = sharing.corrupt(SCORES, "random", 1.0, RNG)
    assert noise.shape == SCORES.shape and abs(np.corrcoef(noise.ravel(), SCORES.ravel())[0, 1]) < 0.1


def test_confidence_and_era_aggregators():
    sure = np.zeros((1, 3), np.float32)
    sure[0, 0] = 20.0  # certain of class 0
    unsure = np.zeros((1, 3), np.float32)  # uniform
    out = aggregate([sure, unsure], "confidence")
    assert out[0, 0] > aggregate([sure, unsure], "mean")[0, 0]
    probs = np.exp(era(np.stack([sure, unsure]), temperature=1.0, era_temperature=0.1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Sharpening: lower entropy than the plain average of probabilities.
    avg = (np.exp(sure) / np.exp(sure).sum() + np.full((1, 3), 1 / 3)) / 2
    entropy = lambda p: -(p * np.log(p)).sum()  # noqa: E731
    assert entropy(probs) < entropy(avg)


@pytest.mark.parametrize(
    "payload, per_row", [("float32", 16 * 4 * 2), ("float16", 16 * 2 * 2), ("topk", 3 * 6 + 16 * 4)]
)
def test_bytes_per_round_are_counted(payload, per_row):
    config = tiny_config(sharing={"payload": payload}, train={"rounds": 1})
    result = run(config, progress=None)
    assert all(r.bytes_per_round == 300 * per_row for r in result.summary)
    # FedAvg moves each model's parameters up and down: measured on the models themselves
    for r in result.summary:
        model = build_model(r.model, (1, 16, 16), 16)
        up = sum(t.numel() * t.element_size() for t in model.parameters())
        assert r.fedavg_bytes_per_round == 2 * up


def test_dp_epsilon_is_reported_per_run(out_dir):
    config = tiny_config(sharing={"clip": 5.0, "noise_multiplier": 2.0})
    result = run(config, out_dir, progress=None)
    eps = [r["epsilon"] for r in result.metrics.to_pylist() if r["epsilon"] is not None]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert "epsilon" in (out_dir / "summary.md").read_text()


@pytest.mark.slow
def test_median_protects_honest_participants_from_scaled_scores():
    honest = {}
    for method in ("mean", "median", "trimmed_mean"):
        config = tiny_config(
            models=["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2", "cnn3:8,8,16,0.1", "cnn2:8,8,0.1"],
            sharing={"adversaries": [0], "attack": "scaled", "attack_scale": 20.0},
            # torch's BatchNorm: with Keras' slow running statistics (the default) these tiny
            # models barely leave their lower bounds in 3 rounds, under any consensus; and 3
            # digest epochs, so that a corrupted consensus has steps enough to do its damage
            # (honest means measured: mean 0.16, median 0.51, trimmed mean 0.55).
            train={
                "consensus": method,
                "rounds": 3,
                "private_epochs": 20,
                "batchnorm": "torch",
                "digest_epochs": 3,
            },
            partition={"samples_per_class": 2},
        )
        result = run(config, progress=None)
        honest[method] = np.mean([r.fedmd_final for r in result.summary if not r.adversary])
    assert honest["median"] > honest["mean"] + 0.05
    assert honest["trimmed_mean"] > honest["mean"] + 0.05


def test_only_metrics_reach_the_driver(ray_session):
    """The dispatcher every Ray call goes through refuses an answer that carries an array:
    scores go to the consensus actor, weights and private data never leave."""
    from fedmd_ray.backends.dispatch import Dispatcher, Step

    class Leaky:
        """An actor that answers a call with its weights among the metrics."""

        def call(self, phase, *args):
            return {"accuracy": 0.5, "weights": np.zeros(3)}, None

    class OneActor:
        """Slots, as slots.py has them, for one participant on one such actor."""

        room = 1

        def __init__(self):
            self.actors = [ray_session.remote(Leaky).remote()]

        def slot(self, index):
            return 0

        def unit(self, index):
            return index

        def send(self, calls, replay=False):
            (call,) = calls
            call.actor = self.actors[0]
            return [tuple(call.remote(call.actor, 2))]

        def answered(self, call):
            pass

    dispatcher = Dispatcher(ray_session, OneActor(), ["p00-leaky"], None, 0)
    with pytest.raises(
        ParticipantError, match="'p00-leaky' failed during evaluate: sent the driver a ndarray"
    ):
        dispatcher.run([Step(Phase.EVALUATE, [0], (1,))])
