"""The configuration of one FedMD run: plain dataclasses, loading, overrides, validation.

Every key a user can set lives here, with its default. Errors name the key and say how to
fix it, so a typo in `--set train.round=5` is caught before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmd_ray.errors import ConfigError, did_you_mean

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "PartitionConfig",
    "ResourcesConfig",
    "SharingConfig",
    "TrainConfig",
]


@dataclass
class DataConfig:
    public: str = "synthetic"
    """Dataset the participants share (see `fedmd-ray datasets`): a built-in name, a
    registered one, npz:PATH, folder:PATH, torchvision:NAME, or module:function /
    file.py:function returning (x, y). uint8 images are scaled as `data.scaling` says; float
    samples (tabular features) go to the model as float32 unscaled, integer samples (token
    ids) as int64."""
    public_classes: list[int] | None = None
    """Classes of the public dataset to use; None means all."""
    private: str = "synthetic"
    """Dataset the private tasks are drawn from."""
    private_classes: list[int] | None = None
    """Classes of the private dataset; None means all. Labels follow the public ones."""
    private_label: str = "fine"
    """'fine', or 'coarse': the private task is CIFAR-100's superclasses, and
    private_classes then names superclasses."""
    data_dir: str | None = None
    """Where datasets live in torchvision's layouts; FEDMD_DATA_DIR (else ./data) when
    unset. A run records the absolute folder it read, so a resume reads the same."""
    download: bool = False
    """Let torchvision download missing datasets (needs internet)."""
    public_train_size: int | None = None
    """Cap on public training samples (seeded subset), to shrink runs."""
    test_size: int | None = None
    """Cap on test samples per task (seeded subset), to shrink evaluation."""
    input_shape: list[int] | None = None
    """(C, H, W) every image is brought to when public and private images differ (e.g.
    [3, 32, 32] for CIFAR-10 with 28x28 grey letters): grey becomes colour by repeating its
    channel, colour becomes grey by luminance, then a bilinear antialiased resize. None:
    shapes must already match."""
    scaling: str = "symmetric"
    """How uint8 images reach the models: 'symmetric' maps [0, 255] to [-1, 1];
    'mean_image' divides by 255 and subtracts each dataset's per-pixel mean image over its
    training samples, public and private separately (the authors' code)."""
    synthetic_image_size: int = 16
    synthetic_train_per_class: int = 300
    synthetic_test_per_class: int = 60


@dataclass
class PartitionConfig:
    kind: str = "per_class"
    """'per_class' (the paper's: N samples of each private class per participant),
    'iid', or 'dirichlet' (label skew with concentration `alpha`)."""
    samples_per_class: int = 3
    samples_per_participant: int = 60
    """Used by 'iid' and 'dirichlet'."""
    alpha: float = 0.5
    min_writer_samples: int = 30
    """'by_writer' (the paper's imbalanced FEMNIST: one writer per participant) draws only
    writers with at least this many private samples. 'one_subclass_per_class' (the paper's
    imbalanced CIFAR, with data.private_label='coarse') gives each participant one random
    subclass of every superclass, samples_per_class of it."""


@dataclass
class TrainConfig:
    lr: float = 1e-3
    optimizer: str = "adam"
    public_epochs: int = 20
    public_batch_size: int = 128
    patience: int = 3
    """Early stopping on the public validation split: epochs without improvement."""
    min_delta: float = 0.001
    private_epochs: int = 25
    private_batch_size: int = 32
    rounds: int = 20
    public_subset_size: int = 5000
    """Public samples drawn afresh each round for the consensus ('alignment')."""
    digest_epochs: int = 1
    digest_batch_size: int = 256
    digest_lr: float | None = None
    """Learning rate of the digest step; None: train.lr."""
    digest_loss: str = "mae"
    """'mae' on logits (the paper's), 'mse' on logits, or 'kl' on softened scores."""
    temperature: float = 1.0
    revisit_epochs: int = 4
    revisit_batch_size: int = 5
    consensus: str = "mean"
    """'mean' (FedMD), 'weighted' (by private data size), 'confidence' (per sample, by each
    participant's top softmax probability), 'median', 'trimmed_mean', or 'era' (DS-FL)."""
    trim_fraction: float = 0.2
    """For trimmed_mean: the fraction dropped at each end, per coordinate."""
    era_temperature: float = 0.1
    """For era: the sharpening temperature applied to the averaged probabilities."""
    upper_bound: bool = True
    """Train each architecture on all private data pooled (the paper's upper bound)."""
    upper_bound_epochs: int = 25
    private_patience: int | None = None
    """Early stopping of the private transfer and of the upper bound as the authors' code
    has it: stop once the test accuracy has not improved by private_min_delta for this many
    epochs (their Keras EarlyStopping watches the private test set). None: train the full
    private_epochs / upper_bound_epochs."""
    private_min_delta: float = 0.001
    batchnorm: str = "keras"
    """BatchNorm of the paper's CNNs: 'keras' (the authors' Keras layers: running averages
    kept with momentum 0.99, i.e. torch's 0.01, and epsilon 1e-3) or 'torch' (torch's
    defaults: momentum 0.1, epsilon 1e-5)."""
    batchnorm_stats: str = "running"
    """BatchNorm's running statistics (what a model normalises with when it is measured):
    'running', the default and the authors' algorithm, as training leaves them; 'recomputed':
    over the public data at the end of public training and over the pooled private data at
    the end of the upper bound, every batch weighing the same (a pass without gradients, as
    torch.optim.swa_utils.update_bn). Running averages lag the data (Keras' momentum moves
    them 1 % a step), so short phases leave them between initialisation and the data:
    on fashion-paper (seed 0) 'recomputed' lifts the mean lower bound from 66 to 76 % and the
    upper bound from 93.1 to 93.9 %, but FedMD then ends at 81.7 % instead of 87.6 % (its
    rounds peak at round 4 and decline), so it is not the default. With torch's BatchNorm it
    helps: the smoke and fashion presets set it (docs/RESULTS.md, "Baselines")."""
    safeguard_holdout: float = 0.0
    """Nobody worse off (off by default: the paper's algorithm has no such step): each
    participant holds out this fraction of its private samples, per class (at least one of
    each class that has two), trains on the rest, and keeps a round's update only if its
    accuracy on the held-out samples does not fall by more than safeguard_tolerance below
    the best it has kept; otherwise it goes back to its model before the round (a metrics
    note says so). The test set is never looked at."""
    safeguard_tolerance: float = 0.0
    """How much held-out accuracy a kept round may lose (see safeguard_holdout)."""
    evaluate_every: int = 1
    """Measure test accuracy every this many rounds (and after the last). 1, the default,
    gives the paper's per-round figure."""
    stratified_subset: bool = True
    """Draw each round's public subset stratified by class (the authors' code); False:
    uniformly at random."""
    participation: float = 1.0
    """Fraction of participants taking part in each round, drawn afresh per round (seeded;
    at least one). Those left out keep their model and are still evaluated."""


@dataclass
class SharingConfig:
    """What leaves a participant each round."""

    payload: str = "float32"
    """'float32' scores, 'float16' (half the bytes), or 'topk' (the k largest per sample)."""
    topk: int = 3
    clip: float | None = None
    """Differential privacy: clip each sample's score vector to this L2 norm (None: off)."""
    noise_multiplier: float = 0.0
    """Gaussian noise std as a multiple of the clipped matrix's sensitivity (needs clip)."""
    delta: float = 1e-5
    """The delta at which epsilon is reported."""
    accountant: str = "auto"
    """Who computes epsilon: 'pld' or 'rdp' (Google's dp-accounting, the [privacy] extra),
    'gdp' (closed form, exact for this mechanism), 'auto' (pld when installed, else gdp)."""
    noise_seed: str = "config"
    """'config': DP noise drawn from the run's seed (repeatable; whoever has config.json can
    regenerate it). 'secret': from the operating system's entropy, for real releases."""
    adversaries: list[int] = field(default_factory=list)
    """Indices of participants that send corrupted scores (a robustness simulation)."""
    attack: str = "random"
    """'random', 'scaled' or 'label_flip'."""
    attack_scale: float = 10.0


@dataclass
class ResourcesConfig:
    backend: str = "ray"
    """'ray' (one actor per participant) or 'local' (sequential, in-process)."""
    address: str | None = None
    """Ray cluster to join ('auto', 'ray://host:10001'); None starts a local Ray."""
    num_cpus: float | None = None
    """CPUs per participant; None shares the cluster's CPUs evenly."""
    num_gpus: float = 0.0
    """GPU fraction per participant, 0 < x <= 1 or a whole number of GPUs."""
    placement: str | None = None
    """Reserve the participants' resources as one placement group: 'PACK' (as few nodes as
    possible), 'SPREAD' (across nodes), 'STRICT_PACK' or 'STRICT_SPREAD'. None: Ray places
    each actor on its own. Inside a Ray Tune trial, the trial's own group is used."""
    device: str = "auto"
    """'auto': CUDA where the participant has a GPU share (resources.num_gpus or its
    per_model entry) and torch sees a device, else the CPU, on either backend; 'cpu'; or
    'cuda' (on the ray backend every participant then needs a GPU share)."""
    torch_threads: int | None = None
    """Torch threads per participant. None: its CPU share, rounded down (at least 1), where
    the share is resources.num_cpus, or the cluster's CPUs split evenly over the
    participants (this machine's cores with the local backend). The same on both backends
    and for a pool, so they compute the same numbers: the thread count changes how torch
    rounds its sums."""
    max_concurrent: int | None = None
    """Ray backend: at most this many participants compute at once. None: all of them on
    GPUs; on CPUs, as many as the cores hold at torch_threads each (more would only
    time-slice the same cores). Changes the speed, never the numbers."""
    quorum: float = 1.0
    """Ray backend: the consensus is formed once this fraction of the round's participants
    has sent scores (and, with deadline_s, the deadline has passed). The rest are late: they
    sit the round out (no digest or revisit) and are recorded as late."""
    deadline_s: float | None = None
    """Ray backend: wait at most this long for everyone's scores, then go on with those that
    answered if they make the quorum (otherwise keep waiting for the quorum)."""
    max_restarts: int = 3
    """Ray backend: a participant whose actor dies is restarted from its last round
    checkpoint (in the object store) and its round replayed, at most this many times per
    run. 0: a dead actor stops the run."""
    runtime_env: dict[str, Any] | None = None
    """Ray backend: Ray's runtime_env for every actor (pip, env_vars, working_dir, ...).
    Model, consensus and digest-loss files named in the config are added to it (py_modules)."""
    actors: int | None = None
    """Ray backend: number of participant actors. None: one per participant. Fewer: a pool
    of actors serves all participants, each participant's state (weights, optimizer) kept
    in the object store between uses and restored bit-exactly."""
    per_model: dict[str, dict[str, float]] | None = None
    """Ray backend, one actor per participant: the share of particular models, keyed by a
    model as `models` writes it ('cnn2:32,64,0.2') or by its name ('cnn2', 'resnet18'), e.g.
    {"resnet18": {"num_gpus": 0.5}, "cnn2": {"num_gpus": 0.1}}; each value may set num_gpus
    and num_cpus. Other participants take num_gpus / num_cpus. A model's GPU share caps the
    GPU memory its actor may hold. Torch threads stay the run's (torch_threads, or the even
    CPU share), so the shares change where and how fast participants run, not their numbers."""
    group: bool = False
    """Ray backend, a pool (resources.actors below the participants): participants of one
    model on one actor compute each round's scores, digest, revisit and evaluation as one
    stacked model (grouped.py): one vmap-ed forward and backward per batch for the group,
    each member keeping its own weights, optimizer state, data order, dropout masks and
    BatchNorm statistics. Faster where per-participant overhead dominates (many small
    models); a member's numbers equal its one-at-a-time numbers up to floating-point
    reordering, so a grouped run repeats for its seed but not bit for bit an ungrouped one
    (the summary says so)."""
    mps: str = "off"
    """Ray backend, GPU actors sharing devices: "auto" starts NVIDIA MPS on each GPU node before
    the actors (or uses a daemon already running there), so that their kernels run side by
    side instead of taking turns on the GPU. A node without nvidia-cuda-mps-control, or where
    a CUDA process cannot run through the daemon, runs without it; placement.json and the
    summary say which. Daemons the run started are stopped when it ends (a Ray Tune trial's
    are left running: other trials may be using them). Same numbers. "off": the nodes are
    left as they are."""
    reuse_actors: bool = False
    """Ray backend, one actor per participant: keep the actors alive when the run ends, for
    the next run in this program with the same resources and code (a loop over seeds or
    variants, a notebook, a test suite), which then skips starting them: a process importing
    torch, ~3 s of CPU each. Numbers are a fresh actor's. Kept actors hold their CPUs and
    GPUs until reused, ray.shutdown() or fedmd_ray.backends.warm.release()."""


@dataclass
class Config:
    name: str = "fedmd"
    seed: int = 0
    models: list[str] = field(default_factory=lambda: ["cnn2:16,32,0.2", "cnn3:16,32,32,0.2"])
    """One model per participant, in order (see `fedmd-ray models`)."""
    participants: int | None = None
    """Number of participants; None means one per entry of `models` (cycled otherwise)."""
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    log: list[str] = field(default_factory=list)
    """Experiment trackers that get every round's metrics and the config: 'tensorboard'
    (event files in RUN_DIR/tensorboard), 'mlflow' (see fedmd_ray.tracking)."""
    faults: list[str] = field(default_factory=list)
    """Simulated failures, 'INDEX:PHASE:ROUND' (PHASE one of transfer, communicate, digest,
    revisit, evaluate): that participant raises there; ':exit' kills its process instead;
    ':sleepS' makes it S seconds late (a straggler). A restored participant does not fail
    again, as a crash is a one-off."""
    checkpoint_every: int = 1
    """With an output directory, write a resumable checkpoint every this many rounds
    (`fedmd-ray run --resume DIR`); 0: never."""

    @property
    def num_participants(self) -> int:
        return self.participants if self.participants is not None else len(self.models)

    def model_of(self, index: int) -> str:
        return self.models[index % len(self.models)]

    def participant_models(self) -> list[str]:
        return [self.model_of(i) for i in range(self.num_participants)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from dicts


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, known: list[str]) -> str:
    return f"{did_you_mean(key, known, cutoff=0.5)} Known keys: {', '.join(sorted(known))}."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn `value` (from JSON or a --set string) into type `tp`, or say why not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a section (a mapping), got {value!r}.")
        return _from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            value = _parse_text(text)
            if not isinstance(value, list) and text.startswith("[") and text.endswith("]"):
                # Most often a shell that ate the quotes: [cnn2,cnn3] is no JSON list, and
                # splitting it at commas would split a spec like cnn2:128,384,0.2 too.
                items = ('"cnn2","cnn3"' if key == "models" else '"a","b"') if args[0] is str else "0,1"
                raise ConfigError(
                    f"'{key}' is {text}, which is not a JSON list: write it as one, quoted for the "
                    f"shell, e.g. --set '{key}=[{items}]'."
                )
            if not isinstance(value, list):
                value = [v.strip() for v in str(value).split(",") if v.strip()]
        if isinstance(value, (tuple, range)):  # from Python
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        return [_coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        if isinstance(value, numbers.Integral):  # exactly, however large (a float has 53 bits)
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass  # "3.0", "1e3": whole numbers written as floats, read below
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.") from None
        if as_float != int(as_float):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        return int(as_float)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {value!r}.") from None
        if not math.isfinite(number):  # a NaN learning rate trains to NaN scores, rounds later
            raise ConfigError(f"'{key}' is {value!r}; it must be a finite number.")
        return number
    if tp is str:
        return str(value)
    return value


def _parse_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types = _field_types(cls)
    unknown = [k for k in values if k not in types]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"Unknown config key '{prefix}{key}'." + _suggest(key, list(types)))
    kwargs = {k: _coerce(v, types[k], f"{prefix}{k}") for k, v in values.items()}
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from nested dicts (defaults fill what is missing) and check its values
    (`validate`). Whether its names resolve (models, datasets, files) is `checks.check`'s."""
    config = _from_dict(Config, values)
    validate(config)
    return config


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['train.rounds=5', 'models=["cnn2",...]'] into a nested dict."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Override '{pair}' must look like key=value, e.g. train.rounds=5.")
        key, text = pair.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_text(text.strip())
    return nested


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (its top level must be a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"Config file '{path}' is not UTF-8 text; a config is a JSON or TOML file "
            "(e.g. one written by `fedmd-ray config --preset smoke > my.json`)."
        ) from None
    return parse_text_config(text, str(path))


def parse_text_config(text: str, where: str) -> dict[str, Any]:
    """A config file's text (JSON, or TOML when `where` ends in .toml) as a dict."""
    try:
        if where.endswith(".toml"):
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"Config file '{where}' could not be parsed: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config file '{where}' holds a {type(values).__name__}; its top level must be an object "
            'of keys, e.g. {"train": {"rounds": 5}}.'
        )
    return values


# ---------------------------------------------------------------- values

BACKENDS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MPS_MODES = ("off", "auto")
PARTITIONS = ("per_class", "iid", "dirichlet", "by_writer", "one_subclass_per_class")
OPTIMIZERS = ("adam", "sgd")
SCALINGS = ("symmetric", "mean_image")
BATCHNORMS = ("keras", "torch")
BATCHNORM_STATS = ("recomputed", "running")
PRIVATE_LABELS = ("fine", "coarse")
PAYLOADS = ("float32", "float16", "topk")
ATTACKS = ("random", "scaled", "label_flip")
ACCOUNTANTS = ("auto", "pld", "rdp", "gdp")
NOISE_SEEDS = ("config", "secret")
TRACKERS = ("tensorboard", "mlflow")


def _check_gpus(key: str, value: float) -> None:
    if value > 1 and value != int(value):
        raise ConfigError(
            f"'{key}' is {value}; above 1 it must be a whole number of GPUs "
            "(Ray cannot give an actor 1.5 GPUs). Use a fraction in (0, 1] or 2, 3, ..."
        )


def model_share(config: Config, model: str) -> dict[str, float]:
    """resources.per_model's entry for `model`: by the spec as written, else by its name."""
    per_model = config.resources.per_model or {}
    return per_model.get(model, per_model.get(model.split(":", 1)[0], {}))


def gpu_share(config: Config, model: str) -> float:
    """The GPUs a participant of `model` gets: its per_model entry, else resources.num_gpus."""
    return float(model_share(config, model).get("num_gpus", config.resources.num_gpus))


def _check_cuda(config: Config) -> None:
    """On Ray, a participant on CUDA must have a GPU share: Ray would place it as if it used
    none, beside others on a GPU it does not account for."""
    r = config.resources
    if r.backend != "ray" or r.device != "cuda":
        return
    without = sorted({m for m in config.participant_models() if not gpu_share(config, m) > 0})
    if without:
        raise ConfigError(
            f"'resources.device' is 'cuda' but {', '.join(without)} ha{'s' if len(without) == 1 else 've'} "
            "no GPU share on the ray backend. Give each participant one (e.g. resources.num_gpus=0.1, "
            "or resources.per_model), or leave resources.device='auto' (CUDA where a share is given)."
        )


def _check_group(config: Config) -> None:
    r = config.resources
    if r.group and (r.backend != "ray" or r.actors is None or r.actors >= config.num_participants):
        raise ConfigError(
            "'resources.group' computes the participants a pool actor serves together; it needs "
            f"the ray backend and 'resources.actors' below the {config.num_participants} participants "
            "(e.g. resources.actors=2), or set resources.group=false."
        )


def _check_mps(config: Config) -> None:
    r = config.resources
    if r.mps in ("True", "False"):
        raise ConfigError(
            f"'resources.mps' is '{r.mps}': YAML reads a bare off or on as a boolean; "
            'write mps: "off" or mps: "auto" (start NVIDIA MPS where GPU actors share a device).'
        )
    _check_choice("resources.mps", r.mps, MPS_MODES)
    if r.mps == "auto" and r.backend != "ray":
        raise ConfigError(
            "'resources.mps' starts NVIDIA MPS for the ray backend's actors; the local backend runs "
            "every participant in one process. Set resources.mps=off or resources.backend=ray."
        )


def _check_per_model(config: Config) -> None:
    r = config.resources
    if not isinstance(r.per_model, dict):
        raise ConfigError(
            "'resources.per_model' must be a mapping from a model to its share, e.g. "
            f'{{"resnet18": {{"num_gpus": 0.5}}}}; got {r.per_model!r}.'
        )
    if r.actors is not None:
        raise ConfigError(
            "'resources.per_model' sizes each participant's own actor; with 'resources.actors' a "
            "pool of equal actors serves every model. Drop one of the two."
        )
    names = {m for model in config.models for m in (model, model.split(":", 1)[0])}
    for model, share in r.per_model.items():
        if model not in names:
            raise ConfigError(
                f"'resources.per_model' names '{model}', which no participant's model is; the "
                f"models here are {', '.join(dict.fromkeys(config.models))}."
            )
        if not isinstance(share, dict) or not share or set(share) - {"num_gpus", "num_cpus"}:
            raise ConfigError(
                f"'resources.per_model.{model}' is {share!r}; it must set num_gpus and/or num_cpus, "
                'e.g. {"num_gpus": 0.25}.'
            )
        for key, value in share.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"'resources.per_model.{model}.{key}' is {value!r}; it must be a number.")
            _check_positive(f"resources.per_model.{model}.{key}", value, allow_zero=key == "num_gpus")
        _check_gpus(f"resources.per_model.{model}.num_gpus", share.get("num_gpus", 0.0))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"'{key}' is '{value}'; it must be one of {', '.join(choices)}.{did_you_mean(value, choices)}"
        )


def _check_positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        need = "zero or more" if allow_zero else "greater than zero"
        raise ConfigError(f"'{key}' is {value}; it must be {need}.")


def _check_fraction(key: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"'{key}' is {value}; it must be a fraction in (0, 1].")


def validate(config: Config) -> None:
    """Raise ConfigError for the first value that cannot work, naming its key. Checks the
    values themselves; `checks.check` checks that names resolve. Changes nothing."""
    if not config.models:
        raise ConfigError("'models' is empty; name at least one model, e.g. models=[\"cnn2\"].")
    if config.participants is not None and config.participants < 1:
        raise ConfigError(f"'participants' is {config.participants}; it must be at least 1.")
    if config.participants is not None and config.participants < len(config.models):
        unused = ", ".join(config.models[config.participants :])
        raise ConfigError(
            f"'participants' is {config.participants} but 'models' names {len(config.models)}: "
            f"{unused} would never run. Drop them from 'models', or set participants to "
            f"{len(config.models)} or more (models are then used in turn), or leave it unset."
        )
    if not config.name.strip() or any(c in config.name for c in "/\\\0"):
        # It names the default results folder (runs/NAME-TIMESTAMP) and the trackers' runs.
        raise ConfigError(
            f"'name' is {config.name!r}; it must be a non-empty name without / or \\ "
            "(it names the results folder), e.g. name=fashion-lr3."
        )
    if not 0 <= config.seed < 2**63:
        raise ConfigError(f"'seed' is {config.seed}; it must be a whole number from 0 to 2**63 - 1.")
    _check_positive("checkpoint_every", config.checkpoint_every, allow_zero=True)
    for name in config.log:
        _check_choice("log", name, TRACKERS)
    _validate_data(config.data)
    _validate_partition(config.partition)
    _validate_train(config.train)
    _validate_sharing(config.sharing, config.num_participants)
    _validate_resources(config.resources)
    if config.resources.per_model is not None:
        _check_per_model(config)
    _check_group(config)
    _check_mps(config)
    _check_cuda(config)


def _validate_data(d: DataConfig) -> None:
    _check_choice("data.private_label", d.private_label, PRIVATE_LABELS)
    _check_choice("data.scaling", d.scaling, SCALINGS)
    for key in (
        "public_train_size",
        "test_size",
        "synthetic_image_size",
        "synthetic_train_per_class",
        "synthetic_test_per_class",
    ):
        _check_positive(f"data.{key}", getattr(d, key))
    for key in ("public_classes", "private_classes"):
        if getattr(d, key) == []:
            raise ConfigError(f"'data.{key}' is empty; name the classes to use, or null for all of them.")
        _check_unique(f"data.{key}", getattr(d, key) or [], "class")
    if d.input_shape is not None and (
        len(d.input_shape) != 3 or any(not isinstance(v, int) or v < 1 for v in d.input_shape)
    ):
        raise ConfigError(
            f"'data.input_shape' is {d.input_shape}; it must be three positive whole numbers "
            "(channels, height, width), e.g. [1, 28, 28]."
        )


def _validate_partition(p: PartitionConfig) -> None:
    _check_choice("partition.kind", p.kind, PARTITIONS)
    for key in ("samples_per_class", "samples_per_participant", "alpha", "min_writer_samples"):
        _check_positive(f"partition.{key}", getattr(p, key))


def _validate_train(t: TrainConfig) -> None:
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("train.batchnorm", t.batchnorm, BATCHNORMS)
    _check_choice("train.batchnorm_stats", t.batchnorm_stats, BATCHNORM_STATS)
    if not 0 <= t.safeguard_holdout < 1:
        raise ConfigError(
            f"'train.safeguard_holdout' is {t.safeguard_holdout}; it must be in [0, 1) "
            "(the fraction of each participant's private samples held out; 0: no safeguard)."
        )
    _check_positive("train.safeguard_tolerance", t.safeguard_tolerance, allow_zero=True)
    for key in ("lr", "digest_lr", "temperature", "era_temperature", "evaluate_every", "private_patience"):
        _check_positive(f"train.{key}", getattr(t, key))
    for key in ("min_delta", "private_min_delta"):
        _check_positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in (
        "public_batch_size",
        "private_batch_size",
        "public_subset_size",
        "digest_batch_size",
        "revisit_batch_size",
        "patience",
    ):
        _check_positive(f"train.{key}", getattr(t, key))
    for key in (
        "public_epochs",
        "private_epochs",
        "rounds",
        "digest_epochs",
        "revisit_epochs",
        "upper_bound_epochs",
    ):
        _check_positive(f"train.{key}", getattr(t, key), allow_zero=True)
    if not 0 <= t.trim_fraction < 0.5:
        raise ConfigError(f"'train.trim_fraction' is {t.trim_fraction}; it must be in [0, 0.5).")
    _check_fraction("train.participation", t.participation)


def _validate_sharing(sh: SharingConfig, participants: int) -> None:
    _check_choice("sharing.payload", sh.payload, PAYLOADS)
    _check_choice("sharing.attack", sh.attack, ATTACKS)
    _check_choice("sharing.accountant", sh.accountant, ACCOUNTANTS)
    _check_choice("sharing.noise_seed", sh.noise_seed, NOISE_SEEDS)
    _check_positive("sharing.topk", sh.topk)
    _check_positive("sharing.clip", sh.clip)
    _check_positive("sharing.noise_multiplier", sh.noise_multiplier, allow_zero=True)
    _check_positive("sharing.attack_scale", sh.attack_scale)
    if not 0 < sh.delta < 1:
        raise ConfigError(f"'sharing.delta' is {sh.delta}; it must be between 0 and 1.")
    if sh.noise_multiplier > 0 and sh.clip is None:
        raise ConfigError(
            "'sharing.noise_multiplier' needs 'sharing.clip' (noise is scaled to the clip norm)."
        )
    bad = [i for i in sh.adversaries if not 0 <= i < participants]
    if bad:
        raise ConfigError(f"'sharing.adversaries' names {bad}; participants are 0..{participants - 1}.")
    _check_unique("sharing.adversaries", sh.adversaries, "participant")


def _check_unique(key: str, values: list, what: str) -> None:
    """A list of distinct things named twice is most often a typo (the other one meant)."""
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(
            f"'{key}' names {what} {', '.join(map(str, twice))} more than once; name each once."
        )


def _validate_resources(r: ResourcesConfig) -> None:
    _check_choice("resources.backend", r.backend, BACKENDS)
    _check_choice("resources.device", r.device, DEVICES)
    if r.placement is not None:
        _check_choice("resources.placement", r.placement, PLACEMENTS)
    _check_positive("resources.num_cpus", r.num_cpus)
    _check_positive("resources.num_gpus", r.num_gpus, allow_zero=True)
    for key in ("torch_threads", "max_concurrent", "deadline_s", "actors"):
        _check_positive(f"resources.{key}", getattr(r, key))
    _check_positive("resources.max_restarts", r.max_restarts, allow_zero=True)
    _check_fraction("resources.quorum", r.quorum)
    if r.runtime_env is not None and not isinstance(r.runtime_env, dict):
        raise ConfigError(
            f'\'resources.runtime_env\' must be a mapping, e.g. {{"pip": ["timm"]}}; got {r.runtime_env!r}.'
        )
    _check_gpus("resources.num_gpus", r.num_gpus)
