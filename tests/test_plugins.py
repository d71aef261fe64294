"""Bring your own: a participant's own model, data, consensus and digest loss, by file,
module or registered name, on the local and the ray backend alike."""

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch import nn

import fedmd_ray
from fedmd_ray import run
from fedmd_ray.cli import main
from fedmd_ray.errors import CheckpointError, ConfigError, ConsensusError, DatasetError, ParticipantError
from fedmd_ray.plugins import MODELS, parse_spec
from tests.conftest import numbers, tiny_config

NETS = """
import torch
from torch import nn
from helpers import HIDDEN  # a neighbour file: shipped with this one


def small(num_classes, image_shape, width=8):
    c = image_shape[0]
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(width * 4, num_classes))


def mlp(num_classes, image_shape, hidden=HIDDEN):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(image_shape).prod()), hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


def wrong_width(num_classes, image_shape):
    return small(num_classes + 1, image_shape)


def not_a_module(num_classes, image_shape):
    return "a string"


def raises(num_classes, image_shape):
    raise RuntimeError("no such layer")


def frozen(num_classes, image_shape):
    model = small(num_classes, image_shape)
    return model.requires_grad_(False)


def nan_scores(num_classes, image_shape):
    return nn.Sequential(small(num_classes, image_shape), nn.Softmax(1), Log0())


class Log0(nn.Module):
    def forward(self, x):
        return torch.log(x * 0)


def int_scores(num_classes, image_shape):
    return nn.Sequential(small(num_classes, image_shape), Round())


class Round(nn.Module):
    def forward(self, x):
        return x.long()


def flat_input(num_classes, image_shape):
    return nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], num_classes)
"""

CONSENSUS = """
import numpy as np


def sharp(scores, weights=None, power=2.0):
    return scores.mean(axis=0) * power


def flat(scores, weights=None):
    return scores.mean(axis=(0, 1))
"""

LOSSES = """
import torch


def huber(outputs, target, delta=1.0):
    return torch.nn.functional.huber_loss(outputs, target, delta=delta)
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's folder outside the repository, as the current directory."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "my_nets.py").write_text(textwrap.dedent(NETS))
    (folder / "helpers.py").write_text("HIDDEN = 16\n")
    (folder / "my_consensus.py").write_text(textwrap.dedent(CONSENSUS))
    (folder / "my_losses.py").write_text(textwrap.dedent(LOSSES))
    monkeypatch.chdir(folder)
    return folder


def test_specs_parse_names_modules_files_and_options():
    plain = parse_spec("small?width=8")
    assert (plain.kind, plain.target, plain.attr, plain.kwargs) == ("name", "small", None, {"width": 8})
    s = parse_spec("nets/mine.py:wide?width=64&depth=3&act=gelu&drop=0.1")
    assert (s.kind, s.target, s.attr) == ("file", "nets/mine.py", "wide")
    assert s.kwargs == {"width": 64, "depth": 3, "act": "gelu", "drop": 0.1}
    assert parse_spec("pkg.models:make").kind == "module"
    with pytest.raises(ConfigError, match="must look like NAME, package.module:function"):
        parse_spec("mine.py:")


@pytest.mark.slow
def test_a_user_model_file_runs_and_is_summarised_like_a_builtin(ray_session, user_dir):
    models = ["my_nets.py:small", "my_nets.py:small?width=12", "cnn2:8,16,0.1"]
    local = run(tiny_config(models=models), user_dir / "local", progress=None)
    ray_run = run(tiny_config(models=models, resources={"backend": "ray"}), user_dir / "ray", progress=None)
    assert numbers(local.metrics.to_pylist()) == numbers(ray_run.metrics.to_pylist())
    rows = {r.participant: r for r in ray_run.summary}
    # The summary names the file that ran, wherever the run is read or resumed from.
    assert rows["p00-small"].model == f"{(user_dir / 'my_nets.py').resolve()}:small"
    assert rows["p01-small"].parameters == sum(
        p.numel() for p in nn.Sequential(nn.Conv2d(1, 12, 3), nn.Linear(48, 16)).parameters()
    )


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "my_nets.py:wrong_width",
            r"p00-wrong_width.*maps a batch of shape \(2, 1, 16, 16\) to \(2, 17\); it must give \(2, 16\)",
        ),
        ("my_nets.py:not_a_module", "returned 'str', not a torch.nn.Module"),
        (
            "my_nets.py:raises",
            r"its factory raised RuntimeError: no such layer \(at \S*/mine/my_nets.py, line 27\)",
        ),
        (
            "my_nets.py:small?depth=3",
            r"its factory is called as small\(num_classes=16, image_shape=\(1, 16, 16\), depth=3\) and "
            r"cannot take that \(got an unexpected keyword argument 'depth'\); it has the signature "
            r"small\(num_classes, image_shape, width=8\)",
        ),
        # Found at the model check, not mid-run: a frozen model failed in transfer learning,
        # NaN scores were refused as "diverged" only after a whole transfer learning.
        ("my_nets.py:frozen", "it has no parameters to train"),
        (
            "my_nets.py:nan_scores",
            "it gives NaN or infinite scores on two public samples before any training",
        ),
        ("my_nets.py:int_scores", r"its scores are torch.int64; they must be floating point"),
        (
            "my_nets.py:flat_input",
            r"it fails on a batch of inputs of shape \(2, 1, 16, 16\) \(torch.float32\): RuntimeError: "
            r"mat1 and mat2 shapes cannot be multiplied",
        ),
        ("my_nets.py:smal", "has no 'smal'. Did you mean 'small'"),
        ("missing.py:small", "file missing.py not found"),
        ("no_such_pkg.models:small", "cannot import module 'no_such_pkg.models'"),
        ("resnet19", "Did you mean 'resnet18'"),
    ],
)
def test_bad_models_are_refused_before_any_work_naming_the_participant(user_dir, model, message):
    with pytest.raises(ConfigError, match=message):
        run(tiny_config(models=[model, "cnn2:8,16,0.1"]), user_dir / "out", progress=None)
    assert not (user_dir / "out").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("my_nets.py:wrong_width", r"p00-wrong_width.*to \(2, 17\); it must give \(2, 16\)"),
        # The user's file, not Ray's copy of it.
        (
            "my_nets.py:raises",
            r"its factory raised RuntimeError: no such layer \(at \S*/mine/my_nets.py, line 27\)",
        ),
    ],
)
def test_on_ray_bad_models_are_refused_before_any_work(ray_session, user_dir, model, message):
    """The driver of Ray actors never loads torch: each participant checks its model in its
    actor, with the user's code shipped there; the refusal reads as on the local backend,
    comes before transfer learning, and leaves nothing running and no results folder."""
    config = tiny_config(models=[model, "cnn2:8,16,0.1"], resources={"backend": "ray", "reuse_actors": False})
    with pytest.raises(ConfigError, match=message):
        run(config, user_dir / "out", progress=None)
    assert not (user_dir / "out").exists()
    from ray.util import list_named_actors

    deadline = time.monotonic() + 20  # ray.kill is asynchronous
    while [a for a in list_named_actors(all_namespaces=True) if a["name"].startswith("fedmd-")]:
        assert time.monotonic() < deadline, "the refused run left its actors running"
        time.sleep(0.2)


@pytest.mark.slow
def test_registered_model_consensus_and_loss_from_a_notebook(ray_session, user_dir):
    def tiny(num_classes, image_shape, width=4):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(image_shape)), num_classes))

    fedmd_ray.register_model("notebook_tiny", tiny)
    fedmd_ray.register_consensus("half_mean", lambda scores, weights=None: scores.mean(axis=0) / 2)
    fedmd_ray.register_digest_loss("l1_sum", lambda out, tgt: (out - tgt).abs().mean())
    settings = {
        "models": ["notebook_tiny", "cnn2:8,16,0.1"],
        "train": {"consensus": "half_mean", "digest_loss": "l1_sum", "rounds": 1},
    }
    local = run(tiny_config(**settings), progress=None)
    on_ray = run(tiny_config(**settings, resources={"backend": "ray"}), progress=None)  # pickled to actors
    assert numbers(local.metrics.to_pylist()) == numbers(on_ray.metrics.to_pylist())


def test_models_lists_registered_names(capsys):
    fedmd_ray.register_model("listed_net", lambda num_classes, image_shape: nn.Linear(1, num_classes))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "listed_net" in out and "cnn2" in out and "file.py:factory" in out


@pytest.mark.slow
def test_user_consensus_and_digest_loss_files(ray_session, user_dir):
    train = {"consensus": "my_consensus.py:sharp?power=1.5", "digest_loss": "my_losses.py:huber?delta=0.5"}
    local = run(tiny_config(train=train), progress=None)
    on_ray = run(tiny_config(train=train, resources={"backend": "ray"}), progress=None)
    assert numbers(local.metrics.to_pylist()) == numbers(on_ray.metrics.to_pylist())
    plain = run(tiny_config(), progress=None)
    assert numbers(plain.metrics.to_pylist()) != numbers(local.metrics.to_pylist())
    with pytest.raises(ConsensusError, match=r"returned shape \(16,\); it must return \(samples, classes\)"):
        run(tiny_config(train={"consensus": "my_consensus.py:flat"}), progress=None)
    with pytest.raises(ConfigError, match="train.consensus.*has no 'sharpp'"):
        tiny_config(train={"consensus": "my_consensus.py:sharpp"})


# ---------------------------------------------------------------- data


def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def _images(n, shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    protos = rng.integers(0, 255, size=(classes, *shape))
    x = np.clip(protos[y] + rng.normal(0, 30, size=(n, *shape)), 0, 255).astype(np.uint8)
    return x, y


def test_an_npz_of_images_in_any_layout(tmp_path):
    from fedmd_ray.data import load_dataset

    x, y = _images(40, (16, 16, 3), 4)
    spec = _npz(tmp_path / "hwc.npz", x, y, x[:8], y[:8])
    ds = load_dataset(spec, train=True)
    assert ds.x.shape == (40, 3, 16, 16) and ds.y.dtype == np.int64
    assert np.array_equal(ds.x[5], x[5].transpose(2, 0, 1))
    grey = load_dataset(_npz(tmp_path / "hw.npz", x[..., 0], y, x[:8, ..., 0], y[:8]), train=False)
    assert grey.x.shape == (8, 1, 16, 16)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(4, int)}, "has no array x_test"),
        (
            {
                "x_train": np.zeros((4, 8, 8), np.uint8),
                "y_train": np.array([0.5, 1, 2, 3]),
                "x_test": np.zeros((1, 8, 8), np.uint8),
                "y_test": np.zeros(1, int),
            },
            "labels must be integers",
        ),
        (
            {
                "x_train": np.zeros((4, 8, 8), np.uint8),
                "y_train": np.zeros(3, int),
                "x_test": np.zeros((1, 8, 8), np.uint8),
                "y_test": np.zeros(1, int),
            },
            "4 samples but 3 labels",
        ),
        (
            {
                "x_train": np.array([[0.5, np.nan], [np.inf, 1.0]], np.float32),
                "y_train": np.zeros(2, int),
                "x_test": np.zeros((1, 2), np.float32),
                "y_test": np.zeros(1, int),
            },
            "2 of its 4 sample values are NaN or infinite",
        ),
        (
            {
                "x_train": np.zeros((3, 8, 8), np.uint8),
                "y_train": np.array([-1, 0, -1]),
                "x_test": np.zeros((1, 8, 8), np.uint8),
                "y_test": np.zeros(1, int),
            },
            r"2 of its 3 labels are below 0 \(the lowest is -1\). Map the classes to 0..K-1",
        ),
    ],
)
def test_bad_npz_data_is_one_clear_error(tmp_path, arrays, message):
    from fedmd_ray.data import load_dataset

    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", train="x_test" not in message)


def test_missing_data_and_missing_classes_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        tiny_config(data={"private": f"npz:{tmp_path / 'nope.npz'}"})
    x, y = _images(40, (16, 16), 4)
    spec = _npz(tmp_path / "four.npz", x, y, x, y)
    with pytest.raises(ConfigError, match=r"names classes \[4, 5\] that 'npz:.*four.npz' does not have"):
        run(tiny_config(data={"private": spec, "private_classes": [0, 4, 5]}), progress=None)
    small, _ = _images(40, (8, 8), 4)  # a test split of other images: refused, not a matmul error mid-run
    spec = _npz(tmp_path / "mixed.npz", x, y, small, y)
    with pytest.raises(
        DatasetError, match=r"its test samples are \(1, 8, 8\) but its train samples \(1, 16, 16\)"
    ):
        run(
            tiny_config(data={"private": spec, "private_classes": [0, 1, 2]}), tmp_path / "out", progress=None
        )
    assert not (tmp_path / "out").exists()
    # One class is no task to learn: every model would score 100 % by always naming it.
    with pytest.raises(
        ConfigError, match=r"data.private_classes leaves one class of 'npz:.*four.npz' \(\[2\]\)"
    ):
        run(tiny_config(data={"private": _npz(tmp_path / "four.npz", x, y, x, y), "private_classes": [2]}))
    one = _npz(tmp_path / "one.npz", x, np.zeros_like(y), x, np.zeros_like(y))
    with pytest.raises(
        ConfigError, match=r"'npz:.*one.npz' holds one class \(\[0\]\); a task to learn needs at least 2\.$"
    ):
        run(tiny_config(data={"public": one, "public_classes": None}), progress=None)


def test_an_image_folder_and_its_empty_class(tmp_path):
    from PIL import Image

    from fedmd_ray.data import load_dataset

    x, y = _images(12, (10, 10), 3)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(x, y)):
            folder = tmp_path / "imgs" / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", train=True)
    assert ds.x.shape == (12, 1, 10, 10) and sorted(set(ds.y.tolist())) == [0, 1, 2]
    assert np.array_equal(ds.x[ds.y == 1][0, 0], x[y == 1][0])
    # A test split without class_1 keeps class_2's label: classes are the train split's names.
    for f in (tmp_path / "imgs" / "test" / "class_1").iterdir():
        f.unlink()
    (tmp_path / "imgs" / "test" / "class_1").rmdir()
    (tmp_path / "imgs" / "test" / ".ipynb_checkpoints").mkdir()
    test = load_dataset(f"folder:{tmp_path / 'imgs'}", train=False)
    assert sorted(set(test.y.tolist())) == [0, 2]
    assert np.array_equal(test.x[test.y == 2][0, 0], x[11])  # 11.png sorts first of class_2
    # A colour image among greyscale ones makes the dataset colour.
    Image.fromarray(np.stack([x[0]] * 3, axis=-1)).save(tmp_path / "imgs" / "test" / "class_0" / "rgb.png")
    test = load_dataset(f"folder:{tmp_path / 'imgs'}", train=False)
    assert test.x.shape[1] == 3 and np.array_equal(test.x[0, 0], x[0])
    (tmp_path / "imgs" / "test" / "class_0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", train=False)
    (tmp_path / "imgs" / "test" / "class_7").mkdir()
    with pytest.raises(DatasetError, match=r"class folders \['class_7'\] that .*train lacks"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", train=False)
    (tmp_path / "imgs" / "train" / "class_9").mkdir()
    with pytest.raises(DatasetError, match="class_9 holds no images"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", train=True)


def test_tabular_features_with_a_user_model(user_dir):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 12)) * 3

    def table(n):
        y = np.arange(n) % 16
        return (centres[y] + rng.normal(size=(n, 12))).astype(np.float32), y

    public = _npz(user_dir / "pub.npz", *table(800), *table(160))
    config = tiny_config(
        models=["my_nets.py:mlp", "my_nets.py:mlp?hidden=32"],
        data={"public": public, "private": public},
        train={"rounds": 2},
    )
    result = run(config, progress=None)
    assert result.summary[0].parameters == 12 * 16 + 16 + 16 * 16 + 16
    assert all(r.fedmd_final > 1 / 6 for r in result.summary)  # better than chance on 6 classes
    with pytest.raises(
        ConfigError, match=r"takes images \(C, H, W\); this data's samples have shape \(12,\)"
    ):
        run(tiny_config(models=["cnn2:8,16,0.1"], data={"public": public, "private": public}), progress=None)


def test_public_and_private_images_of_different_shapes(tmp_path):
    colour, labels = _images(200, (3, 20, 20), 10)
    spec = _npz(tmp_path / "colour.npz", colour, labels, colour[:50], labels[:50])
    data = {"public": spec, "public_classes": None, "private_classes": None}
    with pytest.raises(ConfigError, match=r"differ in shape. For images, set data.input_shape"):
        run(tiny_config(data=data), progress=None)
    result = run(tiny_config(data={**data, "input_shape": [1, 16, 16]}, train={"rounds": 1}), progress=None)
    assert len(result.summary) == 3


def test_conform_images_converts_channels_and_size():
    from fedmd_ray.data import ArrayDataset, conform_images

    red = np.zeros((2, 3, 8, 8), np.uint8)
    red[:, 0] = 200
    grey = conform_images(ArrayDataset(red, np.zeros(2, int)), (1, 4, 4), "x")
    assert grey.x.shape == (2, 1, 4, 4) and np.all(grey.x == round(0.299 * 200))
    back = conform_images(ArrayDataset(grey.x, np.zeros(2, int)), (3, 4, 4), "x")
    assert back.x.shape == (2, 3, 4, 4) and np.all(back.x == grey.x[:, :1])


def test_resume_with_a_user_model_records_the_spec(ray_session, user_dir, monkeypatch, capsys):
    from fedmd_ray.errors import ParticipantError

    models = ["my_nets.py:small", "cnn2:8,16,0.1"]
    data = {"private": "npz:mine.npz", "private_classes": None}
    x, y = _images(160, (16, 16), 4)
    _npz(user_dir / "mine.npz", x[:120], y[:120], x[120:], y[120:])
    whole = run(tiny_config(models=models, data=data, train={"rounds": 2}), user_dir / "whole", progress=None)
    out = user_dir / "stopped"
    with pytest.raises(ParticipantError):
        run(
            tiny_config(models=models, data=data, train={"rounds": 2}, faults=["0:revisit:2"]),
            out,
            progress=None,
        )
    assert "failed during revisit" in (out / "error.txt").read_text()
    # The run records where its files are, so `--resume` works from any directory.
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["models"][0] == f"{(user_dir / 'my_nets.py').resolve()}:small"
    assert recorded["data"]["private"] == f"npz:{(user_dir / 'mine.npz').resolve()}"
    monkeypatch.chdir(user_dir.parent)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    resumed = pq.read_table(out / "metrics.parquet")
    assert numbers(resumed.to_pylist()) == numbers(whole.metrics.to_pylist())
    assert not (out / "error.txt").exists()  # the failure it resumed from is over
    # The checkpoint knows the code, not only its name: an edited model file is refused.
    nets = user_dir / "my_nets.py"
    nets.write_text(nets.read_text() + "\n# edited\n")
    monkeypatch.chdir(user_dir)
    with pytest.raises(CheckpointError, match=r"code \S*my_nets.py:small \('[0-9a-f]{8}"):
        run(tiny_config(models=models, data=data, train={"rounds": 3}), out, progress=None, resume=True)


FLAKY = """
from torch import nn


class Flaky(nn.Module):
    def __init__(self, num_classes, image_shape):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(image_shape[1] * image_shape[2], num_classes))

    def forward(self, x):
        if self.training and len(x) < 64:  # the private data's batches, not the public data's
            raise RuntimeError("a bug in the user's forward")
        return self.head(x)


def flaky(num_classes, image_shape):
    return Flaky(num_classes, image_shape)
"""


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_model_failing_mid_training_leaves_its_traceback(ray_session, user_dir, backend, capsys):
    (user_dir / "flaky.py").write_text(FLAKY)
    config = tiny_config(models=["flaky.py:flaky", "cnn2:8,16,0.1"], resources={"backend": backend})
    with pytest.raises(ParticipantError) as info:
        run(config, user_dir / "run", progress=None)
    trace = user_dir / "run" / "error.txt"
    assert str(info.value) == (
        "Participant 'p00-flaky' failed during transfer: RuntimeError: a bug in the user's forward "
        f"(its traceback: {trace.resolve()})"
    )
    # The line says what failed; the file says where, down to the user's own line.
    text = trace.read_text()
    assert text.startswith("Participant 'p00-flaky' failed during transfer")
    # The user's own file, not Ray's copy of it under /tmp/ray.
    assert (
        f'{(user_dir / "flaky.py").resolve()}", line 12, in forward' in text
        and 'raise RuntimeError("a bug' in text
    )
    assert "fedmd_user_code" not in text
    if backend == "local":  # the command line: the error's line, then what is (not) in the folder
        capsys.readouterr()
        argv = [
            "run",
            "--backend",
            "local",
            "--quiet",
            "--out",
            "cli",
            "--set",
            'models=["flaky.py:flaky","cnn2"]',
        ]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].endswith(f"(its traceback: {(user_dir / 'cli' / 'error.txt').resolve()})")
        assert err[1] == f"no results yet (its config and partition are in {(user_dir / 'cli').resolve()}/)."


@pytest.mark.parametrize("key", ["my_nets.py:small", "my_nets.py"])
def test_a_runs_paths_are_made_absolute_with_the_shares_that_name_them(user_dir, key):
    from fedmd_ray.checks import with_absolute_paths
    from fedmd_ray.config import model_share

    (user_dir / "imgs").mkdir()
    config = tiny_config(
        models=["my_nets.py:small", "cnn2:8,16,0.1"],
        data={"private": "folder:imgs", "data_dir": "data"},
        train={"consensus": "my_consensus.py:sharp?power=1.5"},
        resources={
            "backend": "ray",
            "per_model": {key: {"num_cpus": 1}},
            "runtime_env": {"working_dir": ".", "py_modules": ["libs", "s3://bucket/m.zip"], "pip": ["timm"]},
        },
    )
    absolute = with_absolute_paths(config)
    here = user_dir.resolve()
    assert absolute.models == [f"{here}/my_nets.py:small", "cnn2:8,16,0.1"]
    assert absolute.data.private == f"folder:{here}/imgs" and absolute.data.data_dir == f"{here}/data"
    assert absolute.train.consensus == f"{here}/my_consensus.py:sharp?power=1.5"
    assert [model_share(absolute, m) for m in absolute.models] == [{"num_cpus": 1}, {}]
    env = {"working_dir": str(here), "py_modules": [f"{here}/libs", "s3://bucket/m.zip"], "pip": ["timm"]}
    assert absolute.resources.runtime_env == env  # Ray ships the folder the run started in, on resume too
    assert with_absolute_paths(absolute) == absolute


def test_an_unset_data_dir_is_recorded_as_the_folder_it_stood_for(user_dir, monkeypatch):
    """A run that reads a dataset from the default folder (FEDMD_DATA_DIR, else ./data)
    records that folder, so that a resume from another folder or shell reads the same data;
    a run that reads none (synthetic, npz, folder) records none."""
    from fedmd_ray.checks import with_absolute_paths

    monkeypatch.delenv("FEDMD_DATA_DIR", raising=False)
    config = tiny_config(data={"public": "mnist"})
    assert with_absolute_paths(config).data.data_dir == str(user_dir.resolve() / "data")
    monkeypatch.setenv("FEDMD_DATA_DIR", "shared/sets")
    assert with_absolute_paths(config).data.data_dir == str(user_dir.resolve() / "shared" / "sets")
    assert with_absolute_paths(tiny_config()).data.data_dir is None
    x, y = _images(8, (8, 8), 2)
    spec = _npz(user_dir / "x.npz", x, y, x, y)
    assert with_absolute_paths(tiny_config(data={"private": spec})).data.data_dir is None


def test_a_resume_that_changes_who_answers_in_time_is_refused(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 1}), out, progress=None)
    with pytest.raises(CheckpointError, match=r"resources.quorum \(1.0 -> 0.5\)"):
        run(tiny_config(train={"rounds": 2}, resources={"quorum": 0.5}), out, progress=None, resume=True)
    with pytest.raises(CheckpointError, match=r"resources.torch_threads \(1 -> 2\)"):
        run(tiny_config(train={"rounds": 2}, resources={"torch_threads": 2}), out, progress=None, resume=True)
    # Threads not pinned follow each participant's CPU share, known once the backend is up.
    unpinned = tmp_path / "unpinned"
    run(
        tiny_config(train={"rounds": 1}, resources={"torch_threads": None, "num_cpus": 1}),
        unpinned,
        progress=None,
    )
    with pytest.raises(CheckpointError, match=r"threads per participant \(1 -> 2\)"):
        more = tiny_config(train={"rounds": 2}, resources={"torch_threads": None, "num_cpus": 2})
        run(more, unpinned, progress=None, resume=True)


# ---------------------------------------------------------------- users' code in isolation


def _folder(root, name, files):
    folder = root / name
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(textwrap.dedent(text))
    return folder


NETS_WITH_HELPERS = """
from torch import nn
from helpers import WIDTH


def net(num_classes, image_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], WIDTH),
                         nn.ReLU(), nn.Linear(WIDTH, num_classes))
"""


def test_a_users_statistics_py_does_not_replace_the_standard_librarys(tmp_path):
    import statistics

    folder = _folder(
        tmp_path,
        "mine",
        {
            "statistics.py": "def width():\n    return 5\n",
            "nets.py": "from torch import nn\nimport statistics\n\n\n"
            "def net(num_classes, image_shape):\n    return nn.Linear(statistics.width(), num_classes)\n",
        },
    )
    factory = MODELS.resolve(f"{folder}/nets.py:net")[0]
    assert factory(num_classes=3, image_shape=(1,)).in_features == 5  # its own statistics.py
    import importlib

    assert sys.modules["statistics"] is statistics and importlib.import_module("statistics").mean([1, 3]) == 2
    assert str(folder) not in sys.path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_two_folders_with_the_same_file_names_each_run_their_own(ray_session, tmp_path, monkeypatch, backend):
    for name, width in (("a", 6), ("b", 10)):
        _folder(tmp_path, name, {"nets.py": NETS_WITH_HELPERS, "helpers.py": f"WIDTH = {width}\n"})
    monkeypatch.chdir(tmp_path)
    models = ["a/nets.py:net", "b/nets.py:net", "cnn2:8,16,0.1"]
    result = run(
        tiny_config(models=models, train={"rounds": 1}, resources={"backend": backend}), progress=None
    )
    params = {str(Path(r.model).relative_to(tmp_path.resolve())): r.parameters for r in result.summary[:2]}
    assert params["a/nets.py:net"] == 256 * 6 + 6 + 6 * 16 + 16
    assert params["b/nets.py:net"] == 256 * 10 + 10 + 10 * 16 + 16


def test_standard_library_and_installed_modules_are_imported_not_shipped():
    from fedmd_ray.backends.shipping import user_code
    from fedmd_ray.usercode import module_source

    assert module_source("statistics", "statistics:fmean") is None
    assert module_source("math", "math:fsum") is None  # built into the interpreter
    assert module_source("numpy", "numpy:mean") is None
    shipment = user_code(tiny_config(train={"consensus": "statistics:fmean"}))
    assert shipment.code is None and shipment.staged == []


def test_the_private_upload_is_the_installed_rays():
    """Ray has no public way to give an actor code when the Ray it runs in was started by
    someone else (a notebook, a Tune trial); the private function behind `upload` is pinned
    to the Ray versions it was tested with. A new Ray: run this test, then add its version."""
    import ray

    from fedmd_ray.backends.shipping import UPLOAD_TESTED_WITH

    assert ray.__version__ in UPLOAD_TESTED_WITH


@pytest.mark.slow
def test_shipped_code_is_uploaded_by_uri_and_the_copy_removed(ray_session, user_dir):
    import tempfile

    from fedmd_ray.backends.shipping import upload, user_code

    shipment = user_code(tiny_config(models=["my_nets.py:small", "cnn2:8,16,0.1"]))
    staged = shipment.staged[0]
    assert (staged / shipment.code.package / "d0" / "helpers.py").exists()
    env = upload(shipment.env)
    assert env["py_modules"][0].startswith("gcs://")
    shipment.remove()
    assert not staged.exists()
    before = {p.name for p in Path(tempfile.gettempdir()).glob("fedmd-*")}
    run(
        tiny_config(models=["my_nets.py:small", "cnn2:8,16,0.1"], resources={"backend": "ray"}), progress=None
    )
    assert {p.name for p in Path(tempfile.gettempdir()).glob("fedmd-*")} <= before


@pytest.mark.slow
def test_an_environment_that_cannot_be_set_up_is_one_line_naming_the_participant(ray_session):
    config = tiny_config(
        resources={
            "backend": "ray",
            "reuse_actors": False,
            "runtime_env": {"py_modules": ["gs://fedmd-no-such-bucket/x.zip"]},
        }
    )
    with pytest.raises(ConfigError, match=r"p00-cnn2.*could not set up its runtime_env"):
        run(config, progress=None)


def test_errors_name_the_users_files_not_rays_copies():
    from fedmd_ray.backends.shipping import Shipment
    from fedmd_ray.usercode import Code

    origins = {
        "d0": Path("/home/u/nets"),
        "m/mypkg": Path("/home/u/src/mypkg"),
        "m/single": Path("/opt/single.py"),
    }
    shipment = Shipment(None, Code("fedmd_user_code_0123456789ab", {}, "m"), [], origins)
    copy = "/tmp/ray/session_1/runtime_resources/py_modules_files/_ray_pkg_9f/fedmd_user_code_0123456789ab"
    text = (
        f'  File "{copy}/d0/nets.py", line 3, in small\n'
        f'  File "{copy}/m/mypkg/layers.py", line 9, in forward\n'
        f'  File "{copy}/m/single.py", line 1\n'
        f'  File "{copy}/d7/gone.py", line 2\n'  # not this run's: left as it was
    )
    assert shipment.unship(text) == (
        '  File "/home/u/nets/nets.py", line 3, in small\n'
        '  File "/home/u/src/mypkg/layers.py", line 9, in forward\n'
        '  File "/opt/single.py", line 1\n'
        f'  File "{copy}/d7/gone.py", line 2\n'
    )


def test_an_error_names_the_users_line_not_the_library_it_failed_in(tmp_path):
    """A user's loss that fails inside torch is named at its own line, not torch's."""
    import torch

    from fedmd_ray.errors import raised_at
    from fedmd_ray.plugins import DIGEST_LOSSES

    (tmp_path / "losses.py").write_text(
        "import torch\n\n\ndef bad(outputs, target):\n    return torch.nn.functional.cross_entropy(outputs, target[:, :3])\n"
    )
    loss, _ = DIGEST_LOSSES.resolve(f"{tmp_path}/losses.py:bad")
    with pytest.raises(RuntimeError) as info:
        loss(torch.zeros(2, 5), torch.zeros(2, 5))
    assert raised_at(info.value) == f" (at {tmp_path}/losses.py, line 5)"
    assert raised_at(ValueError("never raised")) == ""


LOADERS = """
import numpy as np


def blobs(train, data_dir, download, n=240):
    rng = np.random.default_rng(0 if train else 1)
    y = rng.integers(0, 4, n)
    x = (rng.integers(0, 255, (4, 16, 16))[y] * 0.7 + rng.integers(0, 80, (n, 16, 16))).astype("uint8")
    return x, y


def positional(train):
    return blobs(train, None, False)


def a_dict(train, data_dir, download):
    return {"x": 1}


def broken(train, data_dir, download):
    raise OSError("the disk went away")
"""


def test_a_users_dataset_loader_feeds_a_run_and_its_mistakes_are_named(user_dir):
    from fedmd_ray.data import load_dataset

    (user_dir / "loaders.py").write_text(textwrap.dedent(LOADERS))
    ds = load_dataset("loaders.py:blobs?n=100", train=False)
    assert ds.x.shape == (100, 1, 16, 16) and ds.y.dtype == np.int64
    config = tiny_config(data={"private": "loaders.py:blobs", "private_classes": None}, train={"rounds": 1})
    result = run(config, user_dir / "out", progress=None)
    assert len(result.summary) == 3
    here = user_dir.resolve()
    with pytest.raises(
        ConfigError,
        match=r"its loader is called as positional\(train=True, data_dir='data', download=False\) ",
    ):
        load_dataset("loaders.py:positional", train=True, data_dir="data")
    with pytest.raises(DatasetError, match="its loader must return \\(x, y\\) arrays or an ArrayDataset"):
        load_dataset("loaders.py:a_dict", train=True)
    with pytest.raises(
        DatasetError, match=rf"raised OSError: the disk went away \(at {here}/loaders.py, line 21\)"
    ):
        load_dataset("loaders.py:broken", train=True)
