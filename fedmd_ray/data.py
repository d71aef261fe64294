"""Datasets as plain numpy arrays: torchvision's files on disk, or synthetic ones made in memory.

Images stay uint8 (N, C, H, W) until a participant normalises a batch, so the public set
is small in the object store and read there without copies.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmd_ray.errors import ConfigError, DatasetError, did_you_mean, raised_at
from fedmd_ray.plugins import DATASETS as REGISTRY
from fedmd_ray.usercode import check_call

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# name -> (torchvision folder, file prefix for idx files, number of classes)
_IDX_DATASETS = {
    "mnist": ("MNIST", "", 10),
    "fashion_mnist": ("FashionMNIST", "", 10),
    "emnist_letters": ("EMNIST", "emnist-letters-", 26),
}
_CIFAR = {"cifar10": 10, "cifar100": 100}
DATASETS = ("synthetic", *_IDX_DATASETS, *_CIFAR)
FORMS = ("npz:PATH", "folder:PATH", "torchvision:NAME")
"""Data of the user's own: an .npz (x_train, y_train, x_test, y_test), an ImageFolder
layout (PATH/train/<class>/*.png, PATH/test/<class>/...), or any torchvision dataset."""
for _name in DATASETS:
    REGISTRY.add_builtin(_name, _name)
_ALIASES = {
    "fashion": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "emnist": "emnist_letters",
    "emnist-letters": "emnist_letters",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


@dataclass
class ArrayDataset:
    x: np.ndarray  # uint8, (N, C, H, W)
    y: np.ndarray  # int64, (N,)
    coarse_y: np.ndarray | None = None  # CIFAR-100 superclasses
    groups: np.ndarray | None = None  # writer ids (FEMNIST), or fine subclasses of a coarse task

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return ArrayDataset(self.x[index], self.y[index], pick(self.coarse_y), pick(self.groups))


def canonical_name(name: str) -> str:
    if ":" in name or name in REGISTRY.user:
        return name.strip()
    key = name.lower().strip()
    return _ALIASES.get(key, key)


def check_dataset_name(name: str) -> None:
    """Refuse, before any work, a dataset that names nothing: an unknown name, an npz file
    or image folder that is not there."""
    form, _, rest = name.partition(":")
    if form in ("npz", "folder"):
        path = Path(rest).expanduser()
        if not (path.is_file() if form == "npz" else path.is_dir()):
            raise DatasetError(
                f"Dataset '{name}': {'file' if form == 'npz' else 'folder'} {path.resolve()} not found."
            )
        return
    if form == "torchvision" and rest:
        return
    if canonical_name(name) in DATASETS or REGISTRY.get(name.partition("?")[0]) is not None:
        return
    if ":" in name:
        REGISTRY.check(name)  # a user's loader: module:function or file.py:function
        return
    known = [*DATASETS, *REGISTRY.user]
    hint = did_you_mean(name.lower(), [*known, *_ALIASES])
    raise ConfigError(
        f"Unknown dataset '{name}'.{hint} Known datasets: {', '.join(known)}; or your own: {', '.join(FORMS)}."
    )


def default_data_dir() -> Path:
    return Path(os.environ.get("FEDMD_DATA_DIR") or "data").expanduser()


def reads_data_dir(name: str) -> bool:
    """Whether dataset `name` is read from data.data_dir (a built-in, a torchvision one, a
    user's loader, which is handed it); synthetic data and npz/folder paths are not."""
    name = canonical_name(name)
    return name != "synthetic" and name.partition(":")[0] not in ("npz", "folder")


def load_dataset(
    name: str,
    train: bool,
    data_dir: str | Path | None = None,
    download: bool = False,
    synthetic: dict | None = None,
) -> ArrayDataset:
    """Load one split of a dataset: images as uint8 NCHW arrays, other data as it comes."""
    name = canonical_name(name)
    check_dataset_name(name)
    if name == "synthetic":
        return make_synthetic(train=train, **(synthetic or {}))
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    form, _, rest = name.partition(":")
    if form == "npz":
        return _load_npz(Path(rest).expanduser(), train, name)
    if form == "folder":
        return _load_folder(Path(rest).expanduser(), train, name)
    if form == "torchvision":
        return _load_torchvision(rest, train, root, download, name)
    if name not in DATASETS:
        loader, kwargs = REGISTRY.resolve(name)
        check_call(
            loader,
            f"Dataset '{name}': its loader",
            "A dataset loader takes train, data_dir and download by those names, and the options "
            "its spec gives (file.py:loader?size=32).",
            train=train,
            data_dir=str(root),
            download=download,
            **kwargs,
        )
        try:
            out = loader(train=train, data_dir=str(root), download=download, **kwargs)
        except FedMDErrorTypes:
            raise
        except Exception as exc:
            raise DatasetError(
                f"Dataset '{name}': its loader raised {type(exc).__name__}: {exc}{raised_at(exc)}"
            ) from None
        if isinstance(out, ArrayDataset):
            return as_dataset(out.x, out.y, name, out.coarse_y, out.groups)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise DatasetError(f"Dataset '{name}': its loader must return (x, y) arrays or an ArrayDataset.")
        return as_dataset(out[0], out[1], name)
    if name in _IDX_DATASETS:
        return _load_idx(name, train, root, download)
    return _load_cifar(name, train, root, download)


def location(name: str, data_dir: str | Path | None = None) -> str:
    """Where a dataset's training split would be read from (for reports)."""
    name = canonical_name(name)
    if name == "synthetic":
        return "made in memory"
    form, _, rest = name.partition(":")
    if form in ("npz", "folder"):
        return str(Path(rest).expanduser().resolve())
    if name not in DATASETS and form != "torchvision":
        return "the user's loader"
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if name in _IDX_DATASETS:
        found = _find_idx(name, True, root)
        return str(found[0].parent) if found else f"not found under {root.resolve()}"
    if form == "torchvision":
        return str(root)
    files = _cifar_files(name, root, True)
    return str(files[0].parent) if all(f.is_file() for f in files) else f"not found under {root.resolve()}"


# ---------------------------------------------------------------- the user's own data

FedMDErrorTypes = (ConfigError, DatasetError)


def as_dataset(
    x: object, y: object, source: str, coarse_y: object = None, groups: object = None
) -> ArrayDataset:
    """Check and normalise arrays a user brought: labels are integers, one per sample;
    uint8 images become (N, C, H, W) (from (N, H, W) or (N, H, W, C)); other data keeps its
    shape, floats as float32 and integers as int64."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise DatasetError(f"Dataset '{source}': {len(x)} samples but {len(y)} labels; they must match.")
    if len(y) == 0:
        raise DatasetError(f"Dataset '{source}' is empty.")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or _integral(y)):
        raise DatasetError(
            f"Dataset '{source}': labels must be integers, one per sample; got {y.dtype} of shape {y.shape}."
        )
    if y.min() < 0:  # else a participant's loss fails deep in torch, or -100 is skipped silently
        raise DatasetError(
            f"Dataset '{source}': labels are class indices counted from 0; {int(np.sum(y < 0))} of its "
            f"{len(y)} labels are below 0 (the lowest is {y.min():g}). Map the classes to 0..K-1."
        )
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.ndim != 4:
            raise DatasetError(
                f"Dataset '{source}': uint8 images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got {x.shape}."
            )
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:  # else it surfaces rounds later as a participant's "diverged" scores
            raise DatasetError(
                f"Dataset '{source}': {bad} of its {x.size} sample values are NaN or infinite; "
                "replace them (e.g. np.nan_to_num) before training on it."
            )
    elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.int64, copy=False)
    else:
        raise DatasetError(f"Dataset '{source}': samples of dtype {x.dtype} cannot be fed to a model.")
    coarse = None if coarse_y is None else np.asarray(coarse_y)
    writers = None if groups is None else np.asarray(groups)
    return ArrayDataset(np.ascontiguousarray(x), y.astype(np.int64), coarse, writers)


def _integral(y: np.ndarray) -> bool:
    return (
        np.issubdtype(y.dtype, np.floating)
        and bool(np.all(np.isfinite(y)))
        and bool(np.all(y == np.round(y)))
    )


def _load_npz(path: Path, train: bool, source: str) -> ArrayDataset:
    split = "train" if train else "test"
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(f"Dataset '{source}': {path} is not a readable .npz ({exc}).") from None
    with archive:
        missing = [k for k in (f"x_{split}", f"y_{split}") if k not in archive.files]
        if missing:
            raise DatasetError(
                f"Dataset '{source}': {path} has no array {missing[0]} (it has {', '.join(archive.files) or 'none'}); "
                "an npz dataset holds x_train, y_train, x_test and y_test."
            )
        return as_dataset(archive[f"x_{split}"], archive[f"y_{split}"], source)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _load_folder(root: Path, train: bool, source: str) -> ArrayDataset:
    """torchvision's ImageFolder layout, split in two: root/train/<class>/..., root/test/<class>/...
    Classes are the train split's folder names in sorted order, and a test image takes the
    label of its folder's name (a test split may lack a class, never add one). Images must
    share one size; greyscale ones among colour ones are made colour."""
    split = root / ("train" if train else "test")
    classes = _class_folders(root / "train", source)
    if not train:
        extra = sorted(set(_class_folders(split, source)) - set(classes))
        if extra:
            raise DatasetError(
                f"Dataset '{source}': {split} has class folders {extra[:5]} that {root / 'train'} "
                "lacks; a test image's class must be one the participants train on."
            )
    xs, ys = [], []
    for label, name in enumerate(classes):
        if not (split / name).is_dir():
            continue
        files = sorted(f for f in (split / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(
                f"Dataset '{source}': class folder {split / name} holds no images ({', '.join(IMAGE_SUFFIXES)})."
            )
        xs += [_read_image(f, source) for f in files]
        ys += [label] * len(files)
    if any(a.ndim == 3 for a in xs):
        xs = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in xs]
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise DatasetError(
            f"Dataset '{source}': images in {split} differ in size ({sorted(shapes)[:3]}); resize them to one size."
        )
    return as_dataset(np.stack(xs), np.asarray(ys), source)


def _class_folders(split: Path, source: str) -> list[str]:
    if not split.is_dir():
        root = split.parent
        raise DatasetError(
            f"Dataset '{source}': folder {split} not found; expected {root}/train/<class>/*.png and {root}/test/<class>/*.png."
        )
    # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are no classes.
    classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"Dataset '{source}': {split} has no class folders.")
    return classes


def _read_image(path: Path, source: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB"))
    except OSError as exc:  # PIL's UnidentifiedImageError (not an image) is one
        raise DatasetError(
            f"Dataset '{source}': cannot read image {path} ({exc}); remove or replace it."
        ) from None


def _load_torchvision(name: str, train: bool, root: Path, download: bool, source: str) -> ArrayDataset:
    """Any torchvision classification dataset by class name (KMNIST, SVHN, USPS, STL10, ...)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type):
        known = [n for n in dir(tvd) if n[:1].isupper()]
        raise ConfigError(
            f"Dataset '{source}': torchvision has no dataset '{name}'.{did_you_mean(name, known)}"
        )
    if download:
        root.mkdir(parents=True, exist_ok=True)
    attempts = ({"train": train}, {"split": "train" if train else "test"})
    last: Exception | None = None
    for kwargs in attempts:
        try:
            ds = cls(str(root), download=download, **kwargs)
            break
        except TypeError as exc:
            last = exc
        except Exception as exc:  # missing files, no network
            hint = "" if download else " Pass --download to let torchvision fetch it."
            raise DatasetError(f"Dataset '{source}' could not be loaded from {root}: {exc}.{hint}") from None
    else:
        raise DatasetError(
            f"Dataset '{source}': torchvision's {name} takes neither train= nor split= ({last})."
        )
    data = getattr(ds, "data", None)
    labels = next((getattr(ds, k) for k in ("targets", "labels") if getattr(ds, k, None) is not None), None)
    if data is not None and labels is not None:
        x = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
        y = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
    else:  # read sample by sample
        pairs = [ds[i] for i in range(len(ds))]
        x = np.stack([np.asarray(img) for img, _ in pairs])
        y = np.asarray([label for _, label in pairs])
    return as_dataset(x, y, source)


def conform_images(ds: ArrayDataset, shape: tuple[int, int, int], source: str) -> ArrayDataset:
    """Bring uint8 images to `shape` (C, H, W): grey to colour by repeating the channel,
    colour to grey by luminance (ITU-R 601), then a bilinear, antialiased resize."""
    if ds.x.dtype != np.uint8 or ds.x.ndim != 4:
        raise ConfigError(
            f"data.input_shape converts images only; '{source}' holds {ds.x.dtype} samples of shape {ds.x.shape[1:]}."
        )
    c, h, w = shape
    if c not in (1, 3):
        raise ConfigError(f"'data.input_shape' must have 1 or 3 channels, got {list(shape)}.")
    if tuple(ds.x.shape[1:]) == tuple(shape):
        return ds
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(ds.x), 4096):
        t = torch.from_numpy(np.array(ds.x[start : start + 4096], dtype=np.float32))
        if t.shape[1] != c:
            if c == 3:
                t = t[:, :1].repeat(1, 3, 1, 1)
            else:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                t = (t[:, :3] * weights).sum(1, keepdim=True)
        if t.shape[2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out.append(t.round().clamp(0, 255).to(torch.uint8).numpy())
    return ArrayDataset(np.concatenate(out), ds.y, ds.coarse_y, ds.groups)


# ---------------------------------------------------------------- synthetic

SYNTHETIC_CHUNK = 4096


def make_synthetic(
    train: bool,
    num_classes: int = 16,
    image_size: int = 16,
    train_per_class: int = 300,
    test_per_class: int = 60,
    seed: int = 1234,
) -> ArrayDataset:
    """Class-structured grey images: each class is a smooth random prototype; samples are
    shifted, contrast-jittered, noisy copies. Learnable, but not from three samples alone."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(num_classes, 4, 4))
    reps = int(np.ceil(image_size / 4))
    protos = np.kron(coarse, np.ones((reps, reps)))[:, :image_size, :image_size]
    # The two splits draw from different streams of the same prototypes.
    split_rng = np.random.default_rng(seed + (1 if train else 2))
    per_class = train_per_class if train else test_per_class
    labels = np.repeat(np.arange(num_classes), per_class)
    split_rng.shuffle(labels)
    shifts = split_rng.integers(-2, 3, size=(len(labels), 2))
    contrast = split_rng.uniform(0.6, 1.4, size=(len(labels), 1, 1))
    # In chunks: float64 images of the whole set at once made a 10 000-participant
    # benchmark's driver peak at 2.6 GiB for 82 MB of pixels. The noise stream is drawn in
    # the same order, so the images are the same either way.
    pixels = np.empty((len(labels), image_size, image_size), dtype=np.uint8)
    for start in range(0, len(labels), SYNTHETIC_CHUNK):
        part = slice(start, start + SYNTHETIC_CHUNK)
        images = protos[labels[part]] * contrast[part]
        images = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts[part])])
        images = images + split_rng.normal(scale=1.1, size=images.shape)
        pixels[part] = np.clip(128 + 40 * images, 0, 255).astype(np.uint8)
    # Pretend writers, so writer-based splits can be exercised without FEMNIST.
    writers = split_rng.permutation(len(labels)) % max(1, len(labels) // 40)
    return ArrayDataset(pixels[:, None], labels.astype(np.int64), groups=writers)


# ---------------------------------------------------------------- MNIST family (idx files)


_UNREADABLE = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    zlib.error,
    pickle.UnpicklingError,
)
"""What a truncated, damaged or foreign data file raises as it is read."""


def _damaged(path: Path, why: str) -> DatasetError:
    return DatasetError(
        f"{path} cannot be read as a dataset file: {why}. It is damaged or truncated (an "
        "interrupted download or copy?): delete it and fetch it again (--download), or copy it anew."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except _UNREADABLE as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from None
    if len(data) < 4 or data[:3] != b"\0\0\x08":  # idx's magic: two zero bytes, then 8 (unsigned bytes)
        raise _damaged(path, "it does not begin as an idx file of bytes does")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = len(data) - (4 + 4 * ndim)
    if body != int(np.prod(shape)):
        raise _damaged(
            path, f"its header promises {int(np.prod(shape))} values of shape {shape}, it holds {body}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_candidates(name: str, root: Path) -> list[Path]:
    folder = _IDX_DATASETS[name][0]
    dirs = [root / folder / "raw", root / folder, root / name, root]
    if name == "fashion_mnist":
        dirs.append(DEBIAN_FASHION_DIR)
    return dirs


def _find_idx(name: str, train: bool, root: Path) -> tuple[Path, Path] | None:
    prefix = _IDX_DATASETS[name][1]
    split = "train" if train else "test" if prefix else "t10k"
    for d in _idx_candidates(name, root):
        for ext in ("", ".gz"):
            images = d / f"{prefix}{split}-images-idx3-ubyte{ext}"
            labels = d / f"{prefix}{split}-labels-idx1-ubyte{ext}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def _load_idx(name: str, train: bool, root: Path, download: bool) -> ArrayDataset:
    found = _find_idx(name, train, root)
    if found is None and download:
        _torchvision_download(name, root)
        found = _find_idx(name, train, root)
    if found is None:
        looked = "\n  ".join(str(d) for d in _idx_candidates(name, root))
        extra = (
            "\nOn Debian, `apt-get install dataset-fashion-mnist` provides these files."
            if name == "fashion_mnist"
            else ""
        )
        raise DatasetError(
            f"Dataset '{name}' ({'train' if train else 'test'} split) not found. Looked in:\n  "
            f"{looked}\nPoint --data-dir (or FEDMD_DATA_DIR) at a folder in torchvision's layout "
            f"({_IDX_DATASETS[name][0]}/raw/...), or pass --download to fetch it.{extra}"
        )
    images, labels = (_read_idx(p) for p in found)
    if len(images) != len(labels) or images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(
            f"Dataset '{name}': {found[0]} holds {images.shape} images and {found[1]} {labels.shape} "
            "labels; they must be N images of H x W and N labels. Fetch the pair again (--download)."
        )
    y = labels.astype(np.int64)
    if name == "emnist_letters":
        # EMNIST is stored transposed, and letters are labelled 1..26.
        images = images.transpose(0, 2, 1)
        y = y - 1
    return ArrayDataset(np.ascontiguousarray(images[:, None]), y)


def _torchvision_download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            if name == "mnist":
                tvd.MNIST(str(root), train=train, download=True)
            elif name == "fashion_mnist":
                tvd.FashionMNIST(str(root), train=train, download=True)
            elif name == "emnist_letters":
                tvd.EMNIST(str(root), split="letters", train=train, download=True)
            elif name == "cifar10":
                tvd.CIFAR10(str(root), train=train, download=True)
            elif name == "cifar100":
                tvd.CIFAR100(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DatasetError(f"Downloading '{name}' into {root} failed: {exc}") from None


# ---------------------------------------------------------------- CIFAR (python pickles)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's files are pickles, and a pickle can run any code while it loads. A data folder
    someone hands you is not code: only numpy arrays (and the lists, dicts, strings and
    numbers around them) are let through; anything else is refused in one line."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2: text to bytes, nothing more
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(
            f"A CIFAR file asks to load {module}.{name}: it holds more than arrays, lists and labels, "
            "and is not read (a pickle can run code). Use the files from the CIFAR site or torchvision."
        )


def _cifar_files(name: str, root: Path, train: bool) -> list[Path]:
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        base = root / "cifar-100-python"
        names = ["train" if train else "test"]
    return [base / n for n in names]


def _load_cifar(name: str, train: bool, root: Path, download: bool) -> ArrayDataset:
    files = _cifar_files(name, root, train)
    if not all(f.is_file() for f in files) and download:
        _torchvision_download(name, root)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(
            f"Dataset '{name}' not found: missing {missing[0]}. Point --data-dir (or "
            f"FEDMD_DATA_DIR) at the folder holding {files[0].parent.name}/ (torchvision's "
            "layout), or pass --download to fetch it."
        )
    xs, ys, coarse = [], [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = _ArraysOnly(fh, encoding="latin1").load()
        except DatasetError:
            raise
        except _UNREADABLE as exc:
            raise _damaged(f, f"{type(exc).__name__}: {exc}") from None
        if not isinstance(batch, dict) or "data" not in batch:
            raise DatasetError(f"{f} is not a CIFAR batch (a pickled dict with 'data'); re-download it.")
        try:
            x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
            if "coarse_labels" in batch:
                coarse.append(np.asarray(batch["coarse_labels"], dtype=np.int64))
        except _UNREADABLE as exc:
            raise _damaged(f, f"its arrays are not CIFAR's ({type(exc).__name__}: {exc})") from None
        if y.shape != (len(x),):
            raise _damaged(f, f"it holds {len(x)} images and {y.size} labels")
        xs.append(x)
        ys.append(y)
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(coarse) if coarse else None)


# ---------------------------------------------------------------- letters with writer ids


def _letters_mat_candidates(root: Path) -> list[Path]:
    return [root / d / "emnist-letters.mat" for d in ("EMNIST/raw", "EMNIST", "matlab", "EMNIST/matlab", ".")]


def _leaf_candidates(root: Path) -> list[Path]:
    return [
        root / d
        for d in ("femnist/data/all_data", "leaf/data/femnist/data/all_data", "femnist/all_data", "femnist")
    ]


def load_letters_by_writer(data_dir: str | Path | None = None) -> ArrayDataset:
    """EMNIST letters (train split) with each sample's writer id in `groups`.

    Reads EMNIST's MATLAB file (`emnist-letters.mat`, which carries writer ids) or LEAF's
    FEMNIST json (`all_data_*.json`, one entry per writer). LEAF's 62 classes are folded to
    the 26 letters, upper and lower case together, as EMNIST letters does."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    for path in _letters_mat_candidates(root):
        if path.is_file():
            return _read_letters_mat(path)
    for folder in _leaf_candidates(root):
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if files:
            return _read_leaf(files)
    looked = "\n  ".join(str(p) for p in [*_letters_mat_candidates(root), *_leaf_candidates(root)])
    raise DatasetError(
        "The by-writer FEMNIST split needs writer ids, from EMNIST's MATLAB file "
        "(emnist-letters.mat) or LEAF's FEMNIST json (femnist/data/all_data/*.json). Looked in:\n  "
        f"{looked}\nPut one of them under --data-dir, or use the balanced split instead: "
        "--preset mnist-femnist."
    )


def _read_letters_mat(path: Path) -> ArrayDataset:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError(f"Reading {path} needs scipy: pip install scipy.") from None
    try:
        train = loadmat(str(path))["dataset"]["train"][0, 0]
        images = train["images"][0, 0].reshape(-1, 28, 28, order="F")  # MATLAB's column order
        labels = np.squeeze(train["labels"][0, 0]).astype(np.int64) - 1
        writers = np.squeeze(train["writers"][0, 0]).astype(np.int64)
    except _UNREADABLE as exc:
        raise _damaged(path, f"not EMNIST's letters MATLAB file ({type(exc).__name__}: {exc})") from None
    return ArrayDataset(np.ascontiguousarray(images.astype(np.uint8)[:, None]), labels, groups=writers)


def _read_leaf(files: list[Path]) -> ArrayDataset:
    import json

    xs, ys, writers = [], [], []
    writer_index: dict[str, int] = {}
    for f in files:
        try:
            blob = json.loads(f.read_text())
            users = [(user, blob["user_data"][user]) for user in blob["users"]]
        except (*_UNREADABLE, json.JSONDecodeError) as exc:
            raise _damaged(f, f"not one of LEAF's FEMNIST json files ({type(exc).__name__}: {exc})") from None
        for user, data in users:
            try:
                y = np.asarray(data["y"], dtype=np.int64)
                keep = y >= 10  # digits are not letters
                x = np.asarray(data["x"], dtype=np.float32)[keep].reshape(-1, 28, 28)
            except _UNREADABLE as exc:
                raise _damaged(
                    f, f"writer {user}'s samples are not 28x28 images ({type(exc).__name__}: {exc})"
                ) from None
            if not keep.any():
                continue
            # LEAF draws ink dark on white in [0, 1]; MNIST-style is white ink on black.
            xs.append(np.clip((1.0 - x) * 255, 0, 255).astype(np.uint8))
            ys.append((y[keep] - 10) % 26)
            writers.append(np.full(int(keep.sum()), writer_index.setdefault(user, len(writer_index))))
    if not xs:
        raise DatasetError(f"LEAF files {files[0].parent} hold no letters.")
    return ArrayDataset(np.concatenate(xs)[:, None], np.concatenate(ys), groups=np.concatenate(writers))
