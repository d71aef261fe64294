"""FedMD on real data, and the presets' baselines. Fashion-MNIST comes from FEDMD_DATA_DIR or Debian's
dataset-fashion-mnist package; MNIST/EMNIST from FEDMD_DATA_DIR. Each test skips, saying
what it needs, when its files are absent."""

import json
from pathlib import Path

import pytest

from fedmd_ray import run
from fedmd_ray.cli import resolve_config
from fedmd_ray.data import _find_idx, default_data_dir
from tests.conftest import real_data_dir

pytestmark = pytest.mark.slow


def _has(name: str) -> bool:
    root = real_data_dir() or default_data_dir()
    return all(_find_idx(name, train, Path(root)) for train in (True, False))


FASHION = pytest.mark.skipif(
    not _has("fashion_mnist"),
    reason="needs Fashion-MNIST: `apt-get install dataset-fashion-mnist` or FEDMD_DATA_DIR",
)


@pytest.mark.parametrize(
    "preset",
    ["smoke", pytest.param("fashion", marks=FASHION), pytest.param("fashion-paper", marks=FASHION)],
)
def test_every_preset_that_runs_here_has_baselines_that_mean_something(ray_session, tmp_path, preset):
    """Read from the run's summary.json: each participant's lower bound (its model trained
    alone) is well above chance on its private task (half again above chance, and 10 points
    over it; the mean at least twice chance), and its upper bound (the same architecture on
    everyone's private data) at least as good.
    Both bounds come from transfer learning and the upper-bound phase, before any round,
    so one round is enough to check them."""
    data_dir = str(real_data_dir()) if real_data_dir() else None
    config = resolve_config(preset, None, ["train.rounds=1", "resources.reuse_actors=true"], data_dir)
    run(config, tmp_path / preset, progress=None)
    rows = json.loads((tmp_path / preset / "summary.json").read_text())["participants"]
    chance = 1 / len(config.data.private_classes)
    assert len(rows) == len(config.models)
    for row in rows:
        assert row["lower_bound"] >= max(1.5 * chance, chance + 0.1), row
        assert row["upper_bound"] >= row["lower_bound"], row
    assert sum(r["lower_bound"] for r in rows) / len(rows) >= 2 * chance, rows


@FASHION
def test_fashion_preset_fedmd_beats_the_lower_bound(ray_session, tmp_path):
    data_dir = str(real_data_dir()) if real_data_dir() else None
    config = resolve_config(
        "fashion",
        None,
        ["train.upper_bound=false", "train.rounds=4", "data.public_train_size=3000", "data.test_size=500"],
        data_dir,
    )
    result = run(config, tmp_path / "fashion", progress=None)
    lower = sum(r.lower_bound for r in result.summary) / len(result.summary)
    final = sum(r.fedmd_final for r in result.summary) / len(result.summary)
    assert final > lower + 0.01, result.summary


@pytest.mark.skipif(
    not (_has("mnist") and _has("emnist_letters")),
    reason="needs MNIST and EMNIST (letters) in FEDMD_DATA_DIR, torchvision layout",
)
def test_mnist_to_emnist_letters_reduced_scale(ray_session, tmp_path):
    config = resolve_config(
        "mnist-femnist",
        None,
        [
            'models=["cnn2:32,64,0.2","cnn3:32,64,64,0.2","cnn2:64,64,0.3","cnn3:32,32,64,0.2"]',
            "data.public_train_size=6000",
            "data.test_size=1200",
            "train.public_epochs=1",
            "train.rounds=5",
            "train.public_subset_size=1000",
            "train.digest_batch_size=64",
            "train.revisit_epochs=2",
            "train.upper_bound=false",
        ],
        str(real_data_dir()),
    )
    result = run(config, tmp_path / "femnist", progress=None)
    assert result.mean_gain > 0, result.summary
