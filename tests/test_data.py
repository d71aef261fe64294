import gzip
import pickle

import numpy as np
import pytest

from fedmd_ray.config import ConfigError
from fedmd_ray.data import DatasetError, load_dataset, make_synthetic
from fedmd_ray.tasks import build_task
from tests.conftest import tiny_config


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_synthetic_is_seeded_and_class_structured():
    a, b = make_synthetic(train=True), make_synthetic(train=True)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (16 * 300, 1, 16, 16) and a.x.dtype == np.uint8
    assert np.bincount(a.y).tolist() == [300] * 16
    test = make_synthetic(train=False)
    assert not np.array_equal(a.x[:60], test.x[:60])


def test_idx_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(raw / "train-images-idx3-ubyte.gz", images)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.array([7, 1, 2]))
    ds = load_dataset("mnist", train=True, data_dir=tmp_path)
    assert ds.x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(ds.x[:, 0], images)
    assert ds.y.tolist() == [7, 1, 2]


def test_emnist_letters_are_transposed_and_zero_based(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 255, size=(2, 28, 28))
    _write_idx(raw / "emnist-letters-test-images-idx3-ubyte.gz", images)
    _write_idx(raw / "emnist-letters-test-labels-idx1-ubyte.gz", np.array([1, 26]))
    ds = load_dataset("emnist_letters", train=False, data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x[0, 0], images[0].T)
    assert ds.y.tolist() == [0, 25]


def test_cifar100_pickles_with_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {
        "data": np.zeros((4, 3072), np.uint8),
        "fine_labels": [0, 2, 20, 63],
        "coarse_labels": [4, 14, 6, 12],
    }
    (folder / "test").write_bytes(pickle.dumps(batch))
    ds = load_dataset("cifar100", train=False, data_dir=tmp_path)
    assert ds.x.shape == (4, 3, 32, 32)
    assert ds.y.tolist() == [0, 2, 20, 63] and ds.coarse_y.tolist() == [4, 14, 6, 12]


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", train=True, data_dir=tmp_path)
    text = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in text and "--data-dir" in text and "--download" in text
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_dataset("cifar10", train=True, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="Unknown dataset 'imagenet'"):
        load_dataset("imagenet", train=True)


def test_task_relabels_private_classes_after_public_ones():
    task = build_task(tiny_config())
    assert task.num_classes == 16
    assert set(np.unique(task.public_train.y)) == set(range(10))
    assert set(np.unique(task.private_test.y)) == set(range(10, 16))
    assert [len(p) for p in task.private_parts] == [18, 18, 18]
    assert task.partition_report[1]["per_class"] == {c: 3 for c in range(10, 16)}
    with pytest.raises(ConfigError, match="share classes"):
        build_task(tiny_config(data={"private_classes": [9, 10]}))
    with pytest.raises(ConfigError, match="does not have"):
        build_task(tiny_config(data={"private_classes": [10, 40]}))


def test_leaf_femnist_json_gives_letters_with_writer_ids(tmp_path):
    import json

    from fedmd_ray.data import load_letters_by_writer

    folder = tmp_path / "femnist" / "data" / "all_data"
    folder.mkdir(parents=True)
    white = [1.0] * 784  # LEAF: ink dark on white
    blob = {
        "users": ["w1", "w2"],
        "num_samples": [3, 2],
        "user_data": {
            "w1": {"x": [white, white, white], "y": [3, 10, 36]},  # a digit, 'A', 'a'
            "w2": {"x": [white, white], "y": [15, 61]},
        },
    }  # 'F', 'z'
    (folder / "all_data_0.json").write_text(json.dumps(blob))
    ds = load_letters_by_writer(tmp_path)
    assert ds.y.tolist() == [0, 0, 5, 25]  # upper and lower case fold together; digits dropped
    assert ds.groups.tolist() == [0, 0, 1, 1]
    assert ds.x.shape == (4, 1, 28, 28) and ds.x.max() == 0  # inverted to white-on-black


def test_a_cifar_file_that_holds_more_than_arrays_is_not_read(tmp_path):
    """A pickle can run code while it loads: CIFAR's files are read with an unpickler that
    takes arrays, lists and labels only."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "train").write_bytes(pickle.dumps({"data": Payload(), "fine_labels": [0]}))
    with pytest.raises(DatasetError, match="asks to load .*open: it holds more than arrays"):
        load_dataset("cifar100", True, str(tmp_path))
    assert not marker.exists()


def test_damaged_dataset_files_are_named_with_the_fix(tmp_path):
    """An interrupted download or copy: the file, what is wrong with it and how to fix it,
    not an EOFError or a reshape error from deep inside the reader."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = raw / "train-images-idx3-ubyte.gz", raw / "train-labels-idx1-ubyte.gz"
    _write_idx(images, np.zeros((50, 28, 28)))
    _write_idx(labels, np.zeros(50))
    whole = images.read_bytes()
    cases = [
        (images, whole[: len(whole) // 2], "EOFError: Compressed file ended"),  # a truncated gzip
        (images, b"garbage", "BadGzipFile: Not a gzipped file"),
        (
            images,
            gzip.compress(gzip.decompress(whole)[:-100]),
            "its header promises 39200 values of shape (50, 28, 28), it holds 39100",
        ),
        (
            images,
            gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)),
            "it does not begin as an idx file of bytes does",
        ),
    ]
    for path, data, why in cases:
        path.write_bytes(data)
        with pytest.raises(DatasetError) as info:
            load_dataset("mnist", train=True, data_dir=tmp_path)
        assert str(info.value).startswith(f"{path} cannot be read as a dataset file: {why}"), info.value
        assert str(info.value).endswith("delete it and fetch it again (--download), or copy it anew.")
    _write_idx(images, np.zeros((50, 28, 28)))
    _write_idx(labels, np.zeros(49))
    with pytest.raises(DatasetError, match=r"holds \(50, 28, 28\) images and .* \(49,\) labels"):
        load_dataset("mnist", train=True, data_dir=tmp_path)

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]})
    (folder / "test").write_bytes(batch[:-40])
    with pytest.raises(
        DatasetError, match=r"cifar-100-python/test cannot be read as a dataset file: \w+Error"
    ):
        load_dataset("cifar100", train=False, data_dir=tmp_path)
    (folder / "test").write_bytes(pickle.dumps({"data": np.zeros((4, 3000), np.uint8), "fine_labels": [0]}))
    with pytest.raises(DatasetError, match="its arrays are not CIFAR's"):
        load_dataset("cifar100", train=False, data_dir=tmp_path)
