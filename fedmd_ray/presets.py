"""Named configurations. Each is a dict of overrides on the defaults in `config.py`."""

from __future__ import annotations

import copy
import difflib
from typing import Any

from fedmd_ray.errors import ConfigError

# The authors' ten architectures (their JSON configs), in their order.
PAPER_MODELS = [
    "cnn2:128,256,0.2",
    "cnn2:128,384,0.2",
    "cnn2:128,512,0.2",
    "cnn2:256,256,0.3",
    "cnn2:256,512,0.4",
    "cnn3:64,128,256,0.2",
    "cnn3:64,128,192,0.2",
    "cnn3:128,192,256,0.2",
    "cnn3:128,128,128,0.3",
    "cnn3:128,128,192,0.3",
]

# FedMD's schedule as the authors configured it: Adam 1e-3; transfer learning batch 128, up
# to 20 epochs with early stopping (patience 3); 20 rounds of 5000 public samples, digest
# 1 epoch at batch 256 with MAE on logits, revisit 4 epochs at batch 5. Private transfer
# learning and the upper bound train at batch 32 for 25 epochs (the authors stopped those
# early on the *test* accuracy; we train a fixed number of epochs instead).
_PAPER_TRAIN = {
    "lr": 1e-3,
    "optimizer": "adam",
    "public_epochs": 20,
    "public_batch_size": 128,
    "patience": 3,
    "min_delta": 0.001,
    "private_epochs": 25,
    "private_batch_size": 32,
    "rounds": 20,
    "public_subset_size": 5000,
    "digest_epochs": 1,
    "digest_batch_size": 256,
    "digest_loss": "mae",
    "revisit_epochs": 4,
    "revisit_batch_size": 5,
    "upper_bound_epochs": 25,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Synthetic images, four different small CNNs: the whole pipeline in about a minute.
    "smoke": {
        "name": "smoke",
        "models": ["cnn2:16,32,0.2", "cnn3:16,32,32,0.2", "cnn2:32,32,0.3", "cnn3:32,32,64,0.2"],
        "data": {
            "public": "synthetic",
            "public_classes": list(range(10)),
            "private": "synthetic",
            "private_classes": list(range(10, 16)),
        },
        "partition": {"kind": "per_class", "samples_per_class": 3},
        "train": {
            "public_epochs": 3,
            "private_epochs": 20,
            "rounds": 4,
            "public_subset_size": 500,
            "revisit_epochs": 2,
            "upper_bound_epochs": 20,
        },
    },
    # Real data that installs offline (Debian's dataset-fashion-mnist): public = six
    # Fashion-MNIST classes, private = the other four, 5 samples per class per participant.
    # The paper's digits -> letters pattern (same modality, disjoint classes), sized for
    # 2 CPU cores.
    "fashion": {
        "name": "fashion",
        "models": ["cnn2:32,64,0.2", "cnn3:32,64,64,0.2", "cnn2:64,64,0.3", "cnn3:32,32,64,0.2"],
        "data": {
            "public": "fashion_mnist",
            "public_classes": [0, 1, 2, 3, 4, 5],
            "private": "fashion_mnist",
            "private_classes": [6, 7, 8, 9],
            "public_train_size": 6000,
            "test_size": 1000,
        },
        "partition": {"kind": "per_class", "samples_per_class": 5},
        # Batch 64 gives the digest 16 steps on 1000 samples, close to the paper's 20.
        "train": {
            "public_epochs": 1,
            "private_epochs": 20,
            "rounds": 6,
            "public_subset_size": 1000,
            "digest_batch_size": 64,
            "revisit_epochs": 2,
            "upper_bound_epochs": 20,
        },
    },
    # The paper's first experiment, balanced: public MNIST, private EMNIST letters a-f.
    "mnist-femnist": {
        "name": "mnist-femnist",
        "models": PAPER_MODELS,
        "data": {"public": "mnist", "private": "emnist_letters", "private_classes": [0, 1, 2, 3, 4, 5]},
        "partition": {"kind": "per_class", "samples_per_class": 3},
        "train": dict(_PAPER_TRAIN),
    },
    # The paper's second experiment, balanced: public CIFAR-10, private six CIFAR-100 classes.
    "cifar10-cifar100": {
        "name": "cifar10-cifar100",
        "models": PAPER_MODELS,
        "data": {"public": "cifar10", "private": "cifar100", "private_classes": [0, 2, 20, 63, 71, 82]},
        "partition": {"kind": "per_class", "samples_per_class": 3},
        "train": {**_PAPER_TRAIN, "min_delta": 0.005},
    },
}


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown preset '{name}'.{hint} Known presets: {', '.join(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])
