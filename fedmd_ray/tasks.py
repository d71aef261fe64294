"""The FedMD task: public data, each participant's private data and the private test set,
in one label space (public classes first, private classes after them, as in the paper's
digits 0-9 followed by letters 10-15)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmd_ray import partition as partition_lib
from fedmd_ray.config import Config, ConfigError
from fedmd_ray.data import ArrayDataset, canonical_name, conform_images, load_dataset, load_letters_by_writer
from fedmd_ray.errors import DatasetError


@dataclass
class Task:
    public_train: ArrayDataset
    public_val: ArrayDataset
    private_parts: list[ArrayDataset]
    private_test: ArrayDataset
    num_classes: int
    public_classes: list[int]
    private_classes: list[int]
    partition_report: list[dict]
    public_mean: np.ndarray | None = None
    """data.scaling='mean_image': per-pixel mean of the public training images, in [0, 1]."""
    private_mean: np.ndarray | None = None
    """... and of the private dataset's training images (all of the private classes)."""

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.public_train.x.shape[1:])  # type: ignore[return-value]

    def pooled_private(self) -> ArrayDataset:
        """All participants' private data together: what the upper bound trains on."""
        return ArrayDataset(
            np.concatenate([p.x for p in self.private_parts]),
            np.concatenate([p.y for p in self.private_parts]),
        )


def _labels(ds: ArrayDataset, coarse: bool) -> np.ndarray:
    if not coarse:
        return ds.y
    if ds.coarse_y is None:
        raise ConfigError("data.private_label='coarse' needs a dataset with superclasses (cifar100).")
    return ds.coarse_y


def _select(ds: ArrayDataset, classes: list[int], offset: int, coarse: bool = False) -> ArrayDataset:
    """Keep samples of `classes` and relabel them offset, offset+1, ... in class order.
    With `coarse`, classes are superclasses and each sample's subclass goes to `groups`."""
    labels = _labels(ds, coarse)
    sub = ds.subset(np.flatnonzero(np.isin(labels, classes)))
    lookup = {c: offset + i for i, c in enumerate(sorted(classes))}
    kept = _labels(sub, coarse)
    relabelled = np.array([lookup[int(c)] for c in kept], dtype=np.int64)
    return ArrayDataset(sub.x, relabelled, groups=sub.y if coarse else sub.groups)


def _cap(ds: ArrayDataset, size: int | None, seed: int) -> ArrayDataset:
    if size is None or size >= len(ds):
        return ds
    index = np.sort(np.random.default_rng(seed).choice(len(ds), size=size, replace=False))
    return ds.subset(index)


def _classes_of(
    ds: ArrayDataset, chosen: list[int] | None, key: str, name: str, coarse: bool = False
) -> list[int]:
    present = sorted(int(c) for c in np.unique(_labels(ds, coarse)))
    if chosen is None:
        return present
    missing = sorted(set(chosen) - set(present))
    if missing:
        raise ConfigError(
            f"'{key}' names classes {missing} that '{name}' does not have "
            f"(it has {present[0]}..{present[-1]})."
        )
    return sorted(set(chosen))


def build_task(config: Config) -> Task:
    """Load, relabel, cap and partition the data a run needs."""
    d = config.data
    synth = {
        "image_size": d.synthetic_image_size,
        "train_per_class": d.synthetic_train_per_class,
        "test_per_class": d.synthetic_test_per_class,
    }

    def load(name: str, train: bool) -> ArrayDataset:
        return load_dataset(name, train, d.data_dir, d.download, synth)

    pub_train, pub_test = load(d.public, True), load(d.public, False)
    same = canonical_name(d.public) == canonical_name(d.private)
    if config.partition.kind == "by_writer":
        priv_train = _writer_pool(d)  # first, so a missing writer file is what the user hears about
        priv_test = pub_test if same else load(d.private, False)
    elif same:
        priv_train, priv_test = pub_train, pub_test
    else:
        priv_train, priv_test = load(d.private, True), load(d.private, False)

    public_classes = _classes_of(pub_train, d.public_classes, "data.public_classes", d.public)
    coarse = d.private_label == "coarse"
    private_classes = _classes_of(priv_train, d.private_classes, "data.private_classes", d.private, coarse)
    for key, name, classes, chosen in (
        ("data.public_classes", d.public, public_classes, d.public_classes),
        ("data.private_classes", d.private, private_classes, d.private_classes),
    ):
        if len(classes) < 2:
            # One class is no task: every model is right by always naming it (a private task
            # of one class gave every lower bound and final 100 %, warned as 'no better than
            # guessing among its 1 classes').
            which = f"{key} leaves one class of '{name}'" if chosen else f"'{name}' holds one class"
            raise ConfigError(
                f"{which} ({list(classes)}); a task to learn needs at least 2"
                + (f": name more in {key}." if chosen else ".")
            )
    if same and set(public_classes) & set(private_classes):
        example = (
            ' (as the smoke preset does: --set "data.public_classes=[0,1,2,3,4,5,6,7,8,9]" --set '
            '"data.private_classes=[10,11,12,13,14,15]"; from Python: from_dict(get_preset("smoke")))'
            if canonical_name(d.public) == "synthetic"
            else ""
        )
        raise ConfigError(
            f"Public and private data both come from '{d.public}' and share classes "
            f"{sorted(set(public_classes) & set(private_classes))}; FedMD's private tasks use "
            f"classes the public data lacks. Set data.public_classes and data.private_classes apart{example}."
        )
    if d.input_shape is not None:
        shape = tuple(d.input_shape)
        pub_train, pub_test = (conform_images(ds, shape, d.public) for ds in (pub_train, pub_test))
        priv_train, priv_test = (conform_images(ds, shape, d.private) for ds in (priv_train, priv_test))
    for name, train, test in ((d.public, pub_train, pub_test), (d.private, priv_train, priv_test)):
        if train.x.shape[1:] != test.x.shape[1:]:
            raise DatasetError(
                f"Dataset '{name}': its test samples are {tuple(test.x.shape[1:])} but its train "
                f"samples {tuple(train.x.shape[1:])}; both splits must hold samples of one shape."
            )
    if pub_train.x.shape[1:] != priv_train.x.shape[1:]:
        raise ConfigError(
            f"Public samples {tuple(pub_train.x.shape[1:])} and private samples "
            f"{tuple(priv_train.x.shape[1:])} differ in shape. For images, set data.input_shape to "
            f"the (C, H, W) both are brought to, e.g. --set 'data.input_shape=[{pub_train.x.shape[1]}, "
            f"{pub_train.x.shape[-2] if pub_train.x.ndim == 4 else 28}, {pub_train.x.shape[-1]}]'."
        )

    offset = len(public_classes)
    public_train = _cap(_select(pub_train, public_classes, 0), d.public_train_size, config.seed)
    public_val = _cap(_select(pub_test, public_classes, 0), d.test_size, config.seed + 1)
    private_pool = _select(priv_train, private_classes, offset, coarse)
    private_test = _cap(_select(priv_test, private_classes, offset, coarse), d.test_size, config.seed + 2)
    num_private = len(np.unique(private_pool.y))

    p = config.partition
    n = config.num_participants
    seed = config.seed + 17
    if p.kind == "per_class":
        parts = partition_lib.per_class(private_pool.y, n, p.samples_per_class, seed)
    elif p.kind == "iid":
        parts = partition_lib.iid(private_pool.y, n, p.samples_per_participant, seed)
    elif p.kind == "dirichlet":
        parts = partition_lib.dirichlet(private_pool.y, n, p.samples_per_participant, p.alpha, seed)
    elif p.kind == "by_writer":
        parts = partition_lib.by_writer(private_pool.y, private_pool.groups, n, p.min_writer_samples, seed)
    else:
        if not coarse:
            raise ConfigError("partition.kind='one_subclass_per_class' needs data.private_label='coarse'.")
        parts = partition_lib.one_subclass_per_class(
            private_pool.y, private_pool.groups, n, p.samples_per_class, seed
        )
    num_classes = offset + num_private
    if config.sharing.topk > num_classes:
        raise ConfigError(
            f"'sharing.topk' is {config.sharing.topk}; this task has {num_classes} classes "
            f"({offset} public + {num_private} private), so it must be at most {num_classes}."
        )
    names = participant_names(config)
    report = partition_lib.report(private_pool.y, parts, names)
    means = {}
    if d.scaling == "mean_image":
        for key, ds in (("public_mean", public_train), ("private_mean", private_pool)):
            if ds.x.dtype != np.uint8:
                raise ConfigError(
                    f"data.scaling='mean_image' is for uint8 images; the {key.split('_')[0]} samples "
                    f"are {ds.x.dtype}. Use data.scaling='symmetric' (it leaves non-image data as is)."
                )
            means[key] = (ds.x.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)
    return Task(
        public_train=public_train,
        public_val=public_val,
        private_parts=[private_pool.subset(ix) for ix in parts],
        private_test=private_test,
        num_classes=num_classes,
        public_classes=public_classes,
        private_classes=private_classes,
        partition_report=report,
        **means,
    )


def _writer_pool(d) -> ArrayDataset:
    """Private training letters with writer ids (synthetic data carries pretend writers)."""
    name = canonical_name(d.private)
    if name == "emnist_letters":
        return load_letters_by_writer(d.data_dir)
    if name == "synthetic":
        return load_dataset(
            name,
            True,
            synthetic={
                "image_size": d.synthetic_image_size,
                "train_per_class": d.synthetic_train_per_class,
                "test_per_class": d.synthetic_test_per_class,
            },
        )
    raise ConfigError(
        f"partition.kind='by_writer' needs writer ids, which '{d.private}' lacks; "
        "use emnist_letters (FEMNIST) or another partition kind."
    )


def participant_names(config: Config) -> list[str]:
    """Stable, readable names: 'p03-cnn2' (also the Ray actor names on the dashboard)."""
    width = max(2, len(str(config.num_participants - 1)))
    return [f"p{i:0{width}d}-{_short(config.model_of(i))}" for i in range(config.num_participants)]


def _short(model: str) -> str:
    """'cnn2:128,256,0.2' -> 'cnn2'; 'nets/mine.py:wide?width=64' -> 'wide' (safe as a file name)."""
    from fedmd_ray.model_names import is_builtin
    from fedmd_ray.plugins import parse_spec

    if is_builtin(model):
        return model.split(":")[0]
    spec = parse_spec(model)
    name = spec.attr or spec.target
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)


def participant_args(task: Task, index: int) -> tuple:
    """What participant `index` is built from besides the public training data: the public
    validation split, its private data, the private test set."""
    part = task.private_parts[index]
    return (
        (task.public_val.x, task.public_val.y),
        (part.x, part.y),
        (task.private_test.x, task.private_test.y),
    )
