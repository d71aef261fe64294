"""The paper presets hold the authors' published configuration, and their splits are the
paper's (checked on stand-in data in the real file formats)."""

import pickle

import numpy as np
import pytest
import torch

from fedmd_ray.cli import resolve_config
from fedmd_ray.config import ConfigError
from fedmd_ray.models import build_model, parameter_count
from fedmd_ray.presets import PAPER_MODELS, get_preset, scale
from fedmd_ray.tasks import build_task

PAPER = ["mnist-femnist", "mnist-femnist-writers", "cifar10-cifar100", "cifar10-cifar100-superclass"]


# The authors' published configuration, copied value by value from their repository
# (FedMD_clean) so that these tests do not depend on the package's own constants.
# conf/*.json: one file per experiment.
_ARCHITECTURES = [  # "models" in every conf file: (type, n1, n2[, n3], dropout_rate)
    ("2_layer_CNN", 128, 256, 0.2),
    ("2_layer_CNN", 128, 384, 0.2),
    ("2_layer_CNN", 128, 512, 0.2),
    ("2_layer_CNN", 256, 256, 0.3),
    ("2_layer_CNN", 256, 512, 0.4),
    ("3_layer_CNN", 64, 128, 256, 0.2),
    ("3_layer_CNN", 64, 128, 192, 0.2),
    ("3_layer_CNN", 128, 192, 256, 0.2),
    ("3_layer_CNN", 128, 128, 128, 0.3),
    ("3_layer_CNN", 128, 128, 192, 0.3),
]
AUTHORS_CONF = {
    "EMNIST_balance_conf.json": {
        "preset": "mnist-femnist",
        "pre_train_params": {"min_delta": 0.001, "patience": 3, "batch_size": 128, "epochs": 20},
        "N_parties": 10,
        "N_samples_per_class": 3,
        "N_alignment": 5000,
        "private_classes": [10, 11, 12, 13, 14, 15],
        "public_classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "N_rounds": 20,
        "N_logits_matching_round": 1,
        "N_private_training_round": 2,
        "private_training_batchsize": 5,
        "logits_matching_batchsize": 256,
    },
    "EMNIST_imbalance_conf.json": {
        "preset": "mnist-femnist-writers",
        "pre_train_params": {"min_delta": 0.001, "patience": 3, "batch_size": 128, "epochs": 20},
        "N_parties": 10,
        "N_samples_per_class": 3,
        "N_alignment": 5000,
        "private_classes": [10, 11, 12, 13, 14, 15],
        "public_classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "N_rounds": 20,
        "N_logits_matching_round": 1,
        "N_private_training_round": 4,
        "private_training_batchsize": 5,
        "logits_matching_batchsize": 256,
    },
    "CIFAR_balance_conf.json": {
        "preset": "cifar10-cifar100",
        "pre_train_params": {"min_delta": 0.005, "patience": 3, "batch_size": 128, "epochs": 20},
        "N_parties": 10,
        "N_samples_per_class": 3,
        "N_alignment": 5000,
        "private_classes": [0, 2, 20, 63, 71, 82],
        "public_classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "N_rounds": 20,
        "N_logits_matching_round": 1,
        "N_private_training_round": 4,
        "private_training_batchsize": 5,
        "logits_matching_batchsize": 256,
    },
    "CIFAR_imbalance_conf.json": {
        "preset": "cifar10-cifar100-superclass",
        "pre_train_params": {"min_delta": 0.005, "patience": 3, "batch_size": 128, "epochs": 20},
        "N_parties": 10,
        "N_samples_per_class": 20,
        "N_alignment": 5000,
        "private_classes": [0, 1, 7, 9, 12, 18],
        "public_classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "N_rounds": 13,
        "N_logits_matching_round": 1,
        "N_private_training_round": 10,
        "private_training_batchsize": 10,
        "logits_matching_batchsize": 128,
    },
}
# FedMD.py, the same for every experiment: Adam(lr=1e-3); private ("full stack") training
# batch 32, epochs 25, and the upper bound batch 32, epochs 50, each with
# EarlyStopping(monitor='val_acc', min_delta=0.001, patience=10) on the private test set.
AUTHORS_FEDMD = {"lr": 1e-3, "private_batch": 32, "private_epochs": 25, "upper_epochs": 50, "patience": 10}


@pytest.mark.parametrize("conf_file", list(AUTHORS_CONF))
def test_paper_presets_hold_the_authors_conf_file(conf_file):
    a = AUTHORS_CONF[conf_file]
    c = resolve_config(a["preset"], None, [])
    t, pre = c.train, a["pre_train_params"]
    models = [
        f"cnn{2 if kind.startswith('2') else 3}:{','.join(str(v) for v in rest)}"
        for kind, *rest in _ARCHITECTURES
    ]
    assert c.models == models and c.num_participants == a["N_parties"]
    assert (t.public_batch_size, t.public_epochs, t.patience, t.min_delta) == (
        pre["batch_size"],
        pre["epochs"],
        pre["patience"],
        pre["min_delta"],
    )
    assert t.public_subset_size == a["N_alignment"] and t.stratified_subset
    assert (t.rounds, t.digest_epochs, t.digest_batch_size) == (
        a["N_rounds"],
        a["N_logits_matching_round"],
        a["logits_matching_batchsize"],
    )
    assert (t.revisit_epochs, t.revisit_batch_size) == (
        a["N_private_training_round"],
        a["private_training_batchsize"],
    )
    assert len(c.data.private_classes) == len(a["private_classes"])
    if a["preset"].startswith("cifar"):
        assert c.data.private_classes == a["private_classes"]
    if c.partition.kind in ("per_class", "one_subclass_per_class"):
        assert c.partition.samples_per_class == a["N_samples_per_class"]
    # FedMD.py
    f = AUTHORS_FEDMD
    assert (t.optimizer, t.lr, t.digest_loss) == ("adam", f["lr"], "mae")
    assert (t.private_batch_size, t.private_epochs, t.upper_bound_epochs) == (
        f["private_batch"],
        f["private_epochs"],
        f["upper_epochs"],
    )
    assert (t.private_patience, t.private_min_delta) == (f["patience"], 0.001)
    # Neural_Networks.py builds BatchNormalization() with Keras' defaults; data_utils.py
    # standardises by /255 less the training set's mean image.
    assert t.batchnorm == "keras" and c.data.scaling == "mean_image"


def test_writer_threshold_is_the_authors_script_value():
    # FEMNIST_Imbalanced.py calls generate_EMNIST_writer_based_data with
    # N_priv_data_min = N_samples_per_class * len(private_classes) = 3 * 6.
    assert resolve_config("mnist-femnist-writers", None, []).partition.min_writer_samples == 3 * 6


def test_paper_cnns_batchnorm_is_keras_by_default_and_torch_on_request():
    def bns(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    keras = bns(build_model("cnn3:8,8,8,0.2", (1, 28, 28), 16))
    assert len(keras) == 3 and all((m.momentum, m.eps) == (0.01, 1e-3) for m in keras)
    torch_bn = bns(build_model("cnn2:8,8,0.2", (1, 28, 28), 16, batchnorm="torch"))
    assert all((m.momentum, m.eps) == (0.1, 1e-5) for m in torch_bn)


def test_paper_data_settings():
    m = get_preset("mnist-femnist")
    assert m["data"] == {
        "public": "mnist",
        "private": "emnist_letters",
        "private_classes": [0, 1, 2, 3, 4, 5],
        "scaling": "mean_image",
    }
    assert m["partition"] == {"kind": "per_class", "samples_per_class": 3}
    assert get_preset("mnist-femnist-writers")["partition"]["kind"] == "by_writer"
    s = get_preset("cifar10-cifar100-superclass")
    assert s["data"]["private_label"] == "coarse"


def test_fashion_paper_preset_is_the_papers_regime():
    c = resolve_config("fashion-paper", None, [])
    assert c.num_participants == 10 and len(set(c.models)) == 10
    assert all(m.startswith(("cnn2:", "cnn3:")) for m in c.models)
    assert c.partition.kind == "per_class" and c.partition.samples_per_class == 3
    assert c.data.public == c.data.private == "fashion_mnist"
    assert not set(c.data.public_classes) & set(c.data.private_classes)
    assert (c.train.revisit_epochs, c.train.revisit_batch_size) == (2, 5)


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
    held = []
    for part in task.private_parts:
        # Six superclasses (labels 10..15), 20 samples of exactly one subclass each.
        labels, counts = np.unique(part.y, return_counts=True)
        assert labels.tolist() == list(range(10, 16)) and counts.tolist() == [20] * 6
        assert len(np.unique(part.groups)) == 6
        held += np.unique(part.groups).tolist()
    # The authors' assignment (CIFAR_Imbalanced.py: relations[j][i % 5]): every one of the six
    # superclasses' 30 subclasses is held, each by exactly two of the ten participants.
    subclasses, holders = np.unique(held, return_counts=True)
    assert len(subclasses) == 30 and set(holders.tolist()) == {2}
    assert sorted(subclasses.tolist()) == sorted(
        f for c in [0, 1, 7, 9, 12, 18] for f in range(5 * c, 5 * c + 5)
    )
    # The balanced CIFAR preset on the same files: the six named fine classes, 3 each.
    balanced = build_task(resolve_config("cifar10-cifar100", None, [], str(tmp_path)))
    assert [len(p) for p in balanced.private_parts] == [18] * 10


def test_scale_shrinks_public_work_only():
    small = scale(get_preset("mnist-femnist"), 0.1)
    assert small["name"] == "mnist-femnist-scale0.1"
    assert small["data"]["public_train_size"] == 6000 and small["data"]["test_size"] == 1000
    t = small["train"]
    assert (t["public_subset_size"], t["rounds"], t["public_epochs"]) == (500, 5, 2)
    assert t["public_subset_size"] / t["digest_batch_size"] == pytest.approx(5000 / 256, rel=0.05)
    assert t["private_epochs"] == 25 and t["revisit_epochs"] == 2
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
