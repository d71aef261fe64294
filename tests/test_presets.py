"""The paper presets hold the authors' published configuration, and their splits are the
paper's (checked on stand-in data in the real file formats)."""

import pickle

import numpy as np
import pytest

from fedmd_ray.cli import resolve_config
from fedmd_ray.config import ConfigError
from fedmd_ray.models import build_model, parameter_count
from fedmd_ray.presets import PAPER_MODELS, get_preset, scale
from fedmd_ray.tasks import build_task

PAPER = ["mnist-femnist", "mnist-femnist-writers", "cifar10-cifar100", "cifar10-cifar100-superclass"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_schedule(name):
    c = resolve_config(name, None, [])
    t = c.train
    assert c.models == PAPER_MODELS and c.num_participants == 10
    assert (t.optimizer, t.lr, t.public_batch_size, t.public_epochs, t.patience) == ("adam", 1e-3, 128, 20, 3)
    assert t.min_delta == (0.005 if name.startswith("cifar") else 0.001)
    assert (t.public_subset_size, t.digest_epochs, t.digest_loss) == (5000, 1, "mae")
    if name == "cifar10-cifar100-superclass":
        assert (t.rounds, t.digest_batch_size, t.revisit_epochs, t.revisit_batch_size) == (13, 128, 10, 10)
    else:
        assert (t.rounds, t.digest_batch_size, t.revisit_epochs, t.revisit_batch_size) == (20, 256, 4, 5)


def test_paper_data_settings():
    m = get_preset("mnist-femnist")
    assert m["data"] == {
        "public": "mnist",
        "private": "emnist_letters",
        "private_classes": [0, 1, 2, 3, 4, 5],
    }
    assert m["partition"] == {"kind": "per_class", "samples_per_class": 3}
    assert get_preset("mnist-femnist-writers")["partition"] == {"kind": "by_writer", "min_writer_samples": 30}
    assert get_preset("cifar10-cifar100")["data"]["private_classes"] == [0, 2, 20, 63, 71, 82]
    s = get_preset("cifar10-cifar100-superclass")
    assert s["data"]["private_label"] == "coarse" and s["data"]["private_classes"] == [0, 1, 7, 9, 12, 18]


# Parameters of the ten paper CNNs with 16 outputs (10 digits + 6 letters) on 28x28 grey
# images, from the layer shapes: conv weights+bias, batch norm scale+shift, bias-free head.
def _expected(spec: str, c: int, size: int, classes: int) -> int:
    name, args = spec.split(":")
    *f, _ = [float(a) for a in args.split(",")]
    f = [int(x) for x in f]
    conv1 = c * f[0] * 9 + f[0] + 2 * f[0]
    if name == "cnn2":
        side = (size - 3) // 2 + 1
        return conv1 + f[0] * f[1] * 9 + f[1] + 2 * f[1] + side * side * f[1] * classes
    side = ((size // 2) // 2 - 3) // 2 + 1
    return (
        conv1
        + f[0] * f[1] * 4
        + f[1]
        + 2 * f[1]
        + f[1] * f[2] * 9
        + f[2]
        + 2 * f[2]
        + side * side * f[2] * classes
    )


@pytest.mark.parametrize("spec", PAPER_MODELS)
def test_paper_model_parameter_counts(spec):
    assert parameter_count(build_model(spec, (1, 28, 28), 16)) == _expected(spec, 1, 28, 16)
    assert parameter_count(build_model(spec, (3, 32, 32), 16)) == _expected(spec, 3, 32, 16)


def test_balanced_split_on_stand_in_data():
    # The mnist-femnist split with synthetic digits/letters: 10 participants x 3 x 6 classes.
    config = resolve_config(
        "mnist-femnist",
        None,
        [
            "data.public=synthetic",
            "data.private=synthetic",
            "data.public_classes=[0,1,2,3,4,5,6,7,8,9]",
            "data.private_classes=[10,11,12,13,14,15]",
        ],
    )
    task = build_task(config)
    assert task.num_classes == 16
    assert [len(p) for p in task.private_parts] == [18] * 10
    for row in task.partition_report:
        assert row["per_class"] == {c: 3 for c in range(10, 16)}


def test_writer_split_on_stand_in_data():
    config = resolve_config(
        "mnist-femnist-writers",
        None,
        [
            "data.public=synthetic",
            "data.private=synthetic",
            "data.public_classes=[0,1,2,3,4,5,6,7,8,9]",
            "data.private_classes=[10,11,12,13,14,15]",
            "partition.min_writer_samples=10",
        ],
    )
    task = build_task(config)
    sizes = [len(p) for p in task.private_parts]
    assert len(sizes) == 10 and min(sizes) >= 10


def _write_cifar(root, rng):
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}
        (c10 / name).write_bytes(pickle.dumps(batch))
    c100 = root / "cifar-100-python"
    c100.mkdir()
    fine = np.repeat(np.arange(100), 205)  # enough for 10 participants x 20 of one subclass
    coarse = fine // 5  # stand-in superclasses: 5 subclasses each
    (c100 / "train").write_bytes(
        pickle.dumps(
            {
                "data": np.zeros((len(fine), 3072), np.uint8),
                "fine_labels": fine.tolist(),
                "coarse_labels": coarse.tolist(),
            }
        )
    )
    test_fine = np.repeat(np.arange(100), 2)
    (c100 / "test").write_bytes(
        pickle.dumps(
            {
                "data": np.zeros((200, 3072), np.uint8),
                "fine_labels": test_fine.tolist(),
                "coarse_labels": (test_fine // 5).tolist(),
            }
        )
    )


def test_superclass_split_on_cifar_format_files(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(0))
    task = build_task(resolve_config("cifar10-cifar100-superclass", None, [], str(tmp_path)))
    assert task.num_classes == 16 and task.image_shape == (3, 32, 32)
    for part in task.private_parts:
        # Six superclasses (labels 10..15), 20 samples of exactly one subclass each.
        labels, counts = np.unique(part.y, return_counts=True)
        assert labels.tolist() == list(range(10, 16)) and counts.tolist() == [20] * 6
        assert len(np.unique(part.groups)) == 6
    # The balanced CIFAR preset on the same files: the six named fine classes, 3 each.
    balanced = build_task(resolve_config("cifar10-cifar100", None, [], str(tmp_path)))
    assert [len(p) for p in balanced.private_parts] == [18] * 10


def test_scale_shrinks_public_work_only():
    small = scale(get_preset("mnist-femnist"), 0.1)
    assert small["data"]["public_train_size"] == 6000 and small["data"]["test_size"] == 1000
    t = small["train"]
    assert (t["public_subset_size"], t["rounds"], t["public_epochs"]) == (500, 5, 2)
    assert t["public_subset_size"] / t["digest_batch_size"] == pytest.approx(5000 / 256, rel=0.05)
    assert t["private_epochs"] == 25 and t["revisit_epochs"] == 4
    with pytest.raises(ConfigError, match="--scale"):
        scale(get_preset("smoke"), 0)


def test_missing_writer_files_say_what_is_needed(tmp_path):
    from fedmd_ray.errors import DatasetError

    config = resolve_config(
        "mnist-femnist-writers",
        None,
        ["data.public=synthetic", "data.public_classes=[0,1,2,3,4,5,6,7,8,9]"],
        str(tmp_path),
    )
    with pytest.raises(DatasetError, match="(?s)emnist-letters.mat.*LEAF.*--preset mnist-femnist"):
        build_task(config)
