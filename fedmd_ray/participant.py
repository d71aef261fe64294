"""One FedMD participant: its own model, private data and optimizers.

This class knows nothing of Ray: the `local` backend calls it directly, the `ray` backend
wraps it in an actor. Every method seeds torch and numpy from (run seed, participant,
phase, round) and runs on the torch threads its spec names, so a participant computes the
same numbers in any process. Its state is what training needs and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import posixpath
import time
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmd_ray import sharing
from fedmd_ray.errors import (
    CheckpointError,
    ConfigError,
    FedMDError,
    ParticipantError,
    format_trace,
    raised_at,
)
from fedmd_ray.faults import fire
from fedmd_ray.heap import keep_freed_memory
from fedmd_ray.models import build_model, check_model, parameter_count
from fedmd_ray.phases import Phase
from fedmd_ray.plugins import BUILTIN_DIGEST_LOSSES, DIGEST_LOSSES, Code
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.storage import Storage

STATE_FORMAT = 2
"""The layout of get_state's blob (and of checkpoint files); older ones are refused."""
EVAL_BATCH_SIZE = 1024
CPU_EVAL_BATCH_SIZE = 128
"""Inference chunk on CPU: the paper CNNs keep full-resolution activation maps, and at 1024
images a chunk the allocator maps (and the kernel zeroes) hundreds of MiB per layer, per
actor; 128 keeps each buffer small enough to be reused, at the same speed."""
PROGRESS_EVERY_SECONDS = 2.0


class _Ticker:
    """Progress of one long call (transfer, upper bound) as a fraction of its samples, sent
    through `report` at most every PROGRESS_EVERY_SECONDS (and whenever `force`d)."""

    def __init__(self, report, participant: str, phase: str, total_samples: int):
        self.report, self.participant, self.phase = report, participant, phase
        self.total = max(1, total_samples)
        self.samples = 0
        self.text = ""
        self.last = 0.0

    def advance(self, samples: int = 0, text: str | None = None, force: bool = False) -> None:
        if self.report is None:
            return
        self.samples += samples
        if text is not None:
            self.text = text
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY_SECONDS:
            self.last = now
            self.report(
                {
                    "kind": "progress",
                    "participant": self.participant,
                    "phase": self.phase,
                    "fraction": min(1.0, self.samples / self.total),
                    "text": self.text,
                }
            )


def prepare(x: np.ndarray, device: torch.device, mean: torch.Tensor | None = None) -> torch.Tensor:
    """A batch as the model sees it: uint8 images scaled to [-1, 1], or to [0, 1] less the
    dataset's `mean` image; other floats as float32; integers (token ids, category codes)
    as int64, unscaled. Object-store arrays are read-only, so the batch is copied (it is
    converted anyway)."""
    t = torch.from_numpy(np.array(x, copy=True)).to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        if mean is not None:
            return t.float() / 255.0 - mean
        return (t.float() / 127.5) - 1.0
    if t.is_floating_point() or t.dtype == torch.bool:
        return t.float()
    return t.long()


def use_threads(threads: int | None) -> None:
    """Run torch on `threads` threads from now on (None: leave them as they are). Calls
    set it every time: a pool actor serves participants one after another, and the count
    decides how torch splits, and so rounds, its sums."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_call(participant: Participant, phase: Phase, *args: Any) -> tuple[dict, Any]:
    """One call as every backend makes it: (metrics for the driver, payload). The payload is
    what a communicate sends (scores); the metrics are numbers only, and say how long the
    call computed."""
    use_threads(participant.spec.torch_threads)
    start = time.perf_counter()
    out = getattr(participant, phase.method)(*args)
    seconds = time.perf_counter() - start
    if phase == Phase.COMMUNICATE:
        return {"seconds": seconds, "bytes_sent": sharing.nbytes(out)}, out
    metrics, payload = out if isinstance(out, tuple) else (out, None)
    return {**metrics, "seconds": seconds}, payload


def build_participant(spec: ParticipantSpec, *data: Any) -> Participant:
    """A participant, or the one-line error that says why it cannot be built (its model,
    its digest loss), naming it."""
    try:
        return Participant(spec, *data)
    except FedMDError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        raise ParticipantError(spec.name, Phase.SETUP, text, format_trace(exc)) from exc


def digest_loss(
    outputs: torch.Tensor, target: torch.Tensor, kind: str, temperature: float = 1.0
) -> torch.Tensor:
    """How far a participant's scores are from the consensus."""
    if kind == "mae":
        return F.l1_loss(outputs, target)
    if kind == "mse":
        return F.mse_loss(outputs, target)
    # Hinton's distillation: KL between softened distributions, scaled by T^2 so gradients
    # keep their size as T changes.
    t = temperature
    return (
        F.kl_div(F.log_softmax(outputs / t, dim=1), F.softmax(target / t, dim=1), reduction="batchmean")
        * t
        * t
    )


def digest_loss_function(kind: str, temperature: float, code: Code | None = None, function: object = None):
    """The digest loss as `(outputs, target) -> scalar`: a built-in, or a user's (registered,
    or a module/file spec), whose answer is checked to be a finite scalar tensor."""
    if kind in BUILTIN_DIGEST_LOSSES:
        return lambda out, tgt: digest_loss(out, tgt, kind, temperature)
    if function is not None:
        from fedmd_ray.plugins import parse_spec

        user, kwargs = function, parse_spec(kind).kwargs
    else:
        user, kwargs = DIGEST_LOSSES.resolve(kind, code)

    def checked(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        loss = user(out, tgt, **kwargs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise BadLoss(kind, f"returned {shape}; it must return a scalar tensor")
        if not torch.isfinite(loss):
            raise BadLoss(kind, f"returned {loss.detach().item()}; it must be finite")
        if out.requires_grad and loss.grad_fn is None:
            raise BadLoss(
                kind, "returned a loss that does not depend on the outputs (no gradient reaches them)"
            )
        return loss.reshape(())

    return checked


class BadLoss(ValueError):
    """A user's digest loss answered what training cannot use."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(f"digest loss '{kind}' {what}")
        self.kind, self.what = kind, what

    def __reduce__(self) -> tuple:
        return BadLoss, (self.kind, self.what)


def holdout_split(
    labels: np.ndarray, fraction: float, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices to train on, indices held out) of a participant's private samples: per class,
    round(fraction x its samples), at least one where a class has two or more, none with
    fraction 0. Seeded by the run and the participant, so every process splits alike."""
    everything = np.arange(len(labels))
    if fraction <= 0:
        return everything, everything[:0]
    rng = np.random.default_rng([seed, index, 0x5AFE])
    held = []
    for c in np.unique(labels):
        members = everything[labels == c]
        k = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        held.extend(rng.choice(members, size=min(k, len(members) - 1), replace=False).tolist())
    held_out = np.sort(np.array(held, dtype=np.int64))
    return np.setdiff1d(everything, held_out), held_out


def _arrays(value: Any) -> Any:
    """`value` with every tensor replaced by a numpy copy of it (0-d ones too, e.g. Adam's
    step: pickling a 0-d tensor costs ~70 us, a dozen of them more than all the arrays)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        try:
            return t.numpy().copy()
        except TypeError:  # bfloat16 and others numpy has no type for
            return t.clone()
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(v) for v in value)
    return value


def _tensors(value: Any, device: torch.device) -> Any:
    """The inverse of _arrays, onto `device`."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True)).to(device)  # object-store arrays are read-only
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _tensors(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(v, device) for v in value)
    return value


def _on(mean: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return (
        None if mean is None else torch.from_numpy(np.array(mean, dtype=np.float32)).to(device)
    )  # writable copy


def _val(accuracy: float) -> str:
    return "" if accuracy != accuracy else f", val acc {accuracy:.3f}"  # NaN before the first epoch


class Participant:
    def __init__(
        self,
        spec: ParticipantSpec,
        public_x: np.ndarray,
        public_y: np.ndarray,
        public_val: tuple[np.ndarray, np.ndarray],
        private: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
    ):
        use_threads(spec.torch_threads)
        keep_freed_memory()
        self.spec = spec
        self.name = spec.name
        self.cfg = spec.train
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"{spec.name}: resources.device is 'cuda' but torch finds no CUDA device in its "
                f"process (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Set resources.device='auto' (CUDA "
                "where a participant has a GPU share, resources.num_gpus) or 'cpu'."
            )
        # 'auto' here means the participant was given a GPU share (fedmd.participant_device);
        # Ray's fake GPUs (ray.init(num_gpus=2)) have no CUDA behind them, so it runs on CPU.
        use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda:
            # Runs repeat number for number on a GPU too: cuDNN's autotuned and atomic-add
            # kernels made two identical local runs on an H100 differ from the first epoch.
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        # The public arrays arrive read-only from the object store; they are never copied whole.
        self.public_x, self.public_y = public_x, public_y
        self.public_val = public_val
        self.public_mean = _on(spec.public_mean, self.device)
        self.private_mean = _on(spec.private_mean, self.device)
        train, held = holdout_split(private[1], self.cfg.safeguard_holdout, spec.seed, spec.index)
        self.private_x = prepare(private[0][train], self.device, self.private_mean)
        self.private_y = torch.from_numpy(np.array(private[1][train], dtype=np.int64)).to(self.device)
        self.holdout = (private[0][held], private[1][held])
        """The private samples the safeguard validates on (none without it)."""
        self.kept_validation: float | None = None
        """The held-out accuracy of the last model the safeguard kept."""
        self.round_start: dict | None = None
        """The state a round started from, until the safeguard has judged the round."""
        self.test_x, self.test_y = test
        self._seed(phase="init")
        self.model = self._checked_model(public_x[:2])
        self.digest_fn = self._checked_digest_loss(num_classes=spec.num_classes)
        self.public_state: dict | None = None
        """The public-pretrained weights, kept from transfer learning until the upper bound."""
        self.digest_opt = self._optimizer(self.model, self.cfg.digest_lr)
        self.private_opt = self._optimizer(self.model)
        self.restored = False
        self.report = None
        """Where progress events go (set by the backend); None: nowhere."""

    # ------------------------------------------------------------ state

    def _state(self) -> dict:
        """Everything training changes between calls: weights, both optimizers, and until
        the upper bound has used them, the public weights. Random state needs no saving:
        every call seeds itself from (seed, participant, phase, round)."""
        return {
            "format": STATE_FORMAT,
            "model": self.model.state_dict(),
            "digest_opt": self.digest_opt.state_dict(),
            "private_opt": self.private_opt.state_dict(),
            "public_state": self.public_state,
            "kept_validation": self.kept_validation,
            "round_start": self.round_start,
        }

    def _take(self, state: dict, restored: bool) -> None:
        self.model.load_state_dict(state["model"])
        self.digest_opt.load_state_dict(state["digest_opt"])
        self.private_opt.load_state_dict(state["private_opt"])
        self.public_state = state["public_state"]
        self.kept_validation = state["kept_validation"]
        self.round_start = state["round_start"]
        self.restored = restored

    def get_state(self) -> bytes:
        """The state as one blob (torch.save), for files and a restarted actor."""
        buffer = io.BytesIO()
        torch.save(self._state(), buffer)
        return buffer.getvalue()

    def snapshot(self) -> dict:
        """The state as numpy arrays in plain containers: for a pool's object store between
        calls, not for files. Ray ships arrays without pickling their bytes: a tiny CNN's
        state costs ~0.6 ms this way (taken and pickled) against 2.3 ms through torch.save,
        and restoring it 0.9 ms against 3.2-4.5 ms (measured on one core)."""
        return _arrays(self._state())

    def restore(self, snapshot: dict, restored: bool = True) -> None:
        """Take a state from snapshot() (this run's own, from the object store)."""
        self._take(_tensors(snapshot, self.device), restored)

    def set_state(self, blob: bytes, restored: bool = True, trusted: bool = False) -> None:
        """Load a state from get_state. `trusted`: it comes from this run's own actors
        through the object store (which Ray unpickles anyway), so torch's restricted
        unpickler, 2.5x slower on a tiny model's state (3.6 vs 1.4 ms), is skipped; files
        are always read with it."""
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=not trusted)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{self.name}: its saved state is of an older fedmd_ray (format "
                f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this one reads "
                f"{STATE_FORMAT}); start the run afresh."
            )
        self._take(state, restored)

    def save(self, location: str | None) -> dict | tuple[dict, bytes]:
        """Write this participant's state to `location` (a file path or URI, written whole);
        return its digest so a resume can tell a damaged file from a good one. With no
        location, hand the state back instead, for whoever writes it."""
        blob = self.get_state()
        metrics = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        if location is None:
            return metrics, blob
        folder, name = posixpath.split(location)
        Storage(folder).write_bytes(name, blob)
        return metrics

    def load(self, location: str | None, sha256: str, blob: bytes | None = None) -> dict:
        """Take the state saved at `location` (or handed over as `blob`), once its digest
        matches the manifest's."""
        if blob is None:
            folder, name = posixpath.split(location)
            try:
                blob = Storage(folder).read_bytes(name)
            except (OSError, FedMDError) as exc:
                raise CheckpointError(
                    f"{self.name}: cannot read its checkpoint {location} ({exc}). Resume where the run's "
                    "folder can be read, or start afresh."
                ) from None
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise CheckpointError(
                f"{self.name}: checkpoint {location or 'state'} is damaged (its checksum does not "
                "match the manifest). Resume from an intact copy or start afresh."
            )
        self.set_state(blob)
        return {"bytes": len(blob)}

    # ------------------------------------------------------------ helpers

    def _build(self) -> nn.Module:
        s = self.spec
        return build_model(s.model, s.image_shape, s.num_classes, s.code, s.model_factory, s.train.batchnorm)

    def _checked_model(self, sample_x: np.ndarray) -> nn.Module:
        """The model, built and run once on two real public samples before any training: a
        factory that fails, returns no nn.Module or gives scores of the wrong shape is
        refused in one line naming this participant."""
        s = self.spec
        sample = prepare(
            sample_x, torch.device("cpu"), self.public_mean.cpu() if self.public_mean is not None else None
        )
        model = check_model(
            s.model,
            sample,
            s.num_classes,
            f"participant {s.name}",
            s.model_factory,
            s.code,
            s.train.batchnorm,
        )
        return model.to(self.device)

    def seed_of(self, phase: str, round_: int = 0) -> int:
        """The seed of one call: a function of (run seed, participant, phase, round) only."""
        return zlib.crc32(f"{self.spec.seed}/{self.spec.index}/{phase}/{round_}".encode())

    def _seed(self, phase: str, round_: int = 0) -> np.random.Generator:
        seed = self.seed_of(phase, round_)
        torch.manual_seed(seed)
        return np.random.default_rng(seed)

    def _checked_digest_loss(self, num_classes: int):
        """The digest loss, tried once on made-up scores before any training: one that
        raises or answers anything but a finite scalar is refused in one line naming this
        participant (not mid-run, after transfer learning)."""
        cfg, s = self.cfg, self.spec
        try:
            loss = digest_loss_function(cfg.digest_loss, cfg.temperature, s.code, s.digest_function)
            generator = torch.Generator().manual_seed(0)
            outputs = torch.randn(2, num_classes, generator=generator, requires_grad=True)
            loss(outputs, torch.randn(2, num_classes, generator=generator)).backward()
        except FedMDError:
            raise
        except Exception as exc:
            what = (
                exc.what
                if isinstance(exc, BadLoss)
                else f"failed: {type(exc).__name__}: {exc}{raised_at(exc)}"
            )
            raise ConfigError(
                f"Digest loss '{cfg.digest_loss}' of participant {s.name}: on made-up scores of shape "
                f"(2, {num_classes}) it {what}"
            ) from None
        return loss

    def _training_state(self) -> dict:
        """A copy of what training changes (weights, BatchNorm statistics, both optimizers)."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "digest_opt": self.digest_opt.state_dict(),
                "private_opt": self.private_opt.state_dict(),
            }
        )

    def _restore_training_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.digest_opt.load_state_dict(state["digest_opt"])
        self.private_opt.load_state_dict(state["private_opt"])

    @torch.no_grad()
    def _recompute_batchnorm(
        self, model: nn.Module, x: np.ndarray | torch.Tensor, mean: torch.Tensor | None
    ) -> None:
        """BatchNorm's running statistics recomputed over `x`, the data a phase trained on,
        every batch weighing the same (train.batchnorm_stats; as torch.optim.swa_utils.update_bn)."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.cfg.batchnorm_stats != "recomputed" or not norms or len(x) < 2:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        step = EVAL_BATCH_SIZE if self.device.type == "cuda" else CPU_EVAL_BATCH_SIZE
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            if len(chunk) < 2:
                continue  # BatchNorm needs two samples in train mode
            model(chunk if isinstance(chunk, torch.Tensor) else prepare(chunk, self.device, mean))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def maybe_fail(self, phase: Phase, round_: int = 0) -> None:
        if not self.restored:  # simulated crashes are one-offs: the replacement does not crash again
            fire(self.spec.faults, phase, round_)

    def _optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        lr = lr or self.cfg.lr
        decay = getattr(model, "head_weight_decay", 0.0)
        head = [p for n, p in model.named_parameters() if n.startswith("head.")] if decay else []
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        groups = [{"params": body, "weight_decay": 0.0}]
        if head:
            groups.append({"params": head, "weight_decay": decay})
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9)
        return torch.optim.Adam(groups, lr=lr)

    def _fit(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        x: np.ndarray | torch.Tensor,
        targets: torch.Tensor | np.ndarray,
        batch_size: int,
        rng: np.random.Generator,
        loss_fn,
        ticker: _Ticker | None = None,
    ) -> float:
        """One epoch over (x, targets); returns the mean loss."""
        model.train()
        n = len(targets)
        order = rng.permutation(n)
        total, count = 0.0, 0
        if isinstance(targets, np.ndarray):
            targets = torch.from_numpy(np.array(targets))  # object-store arrays are read-only
        targets = targets.to(self.device)
        on_device = isinstance(x, torch.Tensor)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n >= 2:
                # BatchNorm cannot train on one sample; fold it into the previous batch's epoch.
                continue
            xb = (
                x[torch.as_tensor(idx, device=self.device)]
                if on_device
                else prepare(x[np.sort(idx)], self.device, self.public_mean)
            )
            yb = targets[torch.as_tensor(idx if on_device else np.sort(idx), device=self.device)]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if ticker is not None:
                ticker.advance(len(idx))
        return total / max(count, 1)

    @torch.no_grad()
    def _scores(
        self, model: nn.Module, x: np.ndarray | torch.Tensor, mean: torch.Tensor | None = None
    ) -> torch.Tensor:
        model.eval()
        outs = []
        step = EVAL_BATCH_SIZE if self.device.type == "cuda" else CPU_EVAL_BATCH_SIZE
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            xb = chunk if isinstance(chunk, torch.Tensor) else prepare(chunk, self.device, mean)
            outs.append(model(xb))
        return torch.cat(outs)

    def _accuracy(
        self, model: nn.Module, x: np.ndarray, y: np.ndarray, mean: torch.Tensor | None = None
    ) -> tuple[float, float]:
        return self.judge(self._scores(model, x, mean), y)

    def judge(self, scores: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, cross-entropy) of `scores` against labels `y`."""
        target = torch.from_numpy(np.array(y, dtype=np.int64)).to(self.device)
        loss = float(F.cross_entropy(scores, target))
        return float((scores.argmax(1) == target).float().mean()), loss

    # ------------------------------------------------------------ the FedMD steps

    def describe(self) -> dict:
        return {
            "participant": self.name,
            "model": self.spec.model,
            "parameters": parameter_count(self.model),
            "device": str(self.device),
            "private_samples": int(len(self.private_y)),
            "threads": torch.get_num_threads(),
            "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
        }

    def transfer(self) -> dict:
        """Transfer learning: the public data (early stopping on its validation split), then
        the private data. The test accuracy after this is the participant's lower bound."""
        self.maybe_fail(Phase.TRANSFER)
        cfg = self.cfg
        rng = self._seed(Phase.TRANSFER)
        opt = self._optimizer(self.model)
        best, stale, public_epochs, public_acc = -1.0, 0, 0, float("nan")
        val_x, val_y = self.public_val
        public_n, private_n = len(self.public_y), len(self.private_y)
        ticker = _Ticker(
            self.report,
            self.name,
            Phase.TRANSFER,
            cfg.public_epochs * public_n + cfg.private_epochs * private_n,
        )
        for epoch in range(1, cfg.public_epochs + 1):
            ticker.advance(text=f"public epoch {epoch}/{cfg.public_epochs}" + _val(public_acc))
            self._fit(
                self.model,
                opt,
                self.public_x,
                self.public_y,
                cfg.public_batch_size,
                rng,
                F.cross_entropy,
                ticker,
            )
            public_epochs += 1
            public_acc, _ = self._accuracy(self.model, val_x, val_y, self.public_mean)
            if public_acc > best + cfg.min_delta:
                best, stale = public_acc, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    # What the skipped epochs would have cost no longer counts as work left.
                    ticker.total -= (cfg.public_epochs - epoch) * public_n
                    ticker.advance(
                        text=f"public: early stop after epoch {epoch}" + _val(public_acc), force=True
                    )
                    break
            ticker.advance(text=f"public epoch {epoch}/{cfg.public_epochs} done" + _val(public_acc))
        self._recompute_batchnorm(self.model, self.public_x, self.public_mean)
        if cfg.upper_bound:
            self.public_state = copy.deepcopy(self.model.state_dict())
        # One optimiser for the private data from here on: the authors' Keras classifier
        # keeps its Adam state from this private training into every revisit.
        self.private_opt = self._optimizer(self.model)
        loss, private_epochs = self._train_private(
            self.model,
            self.private_opt,
            self.private_x,
            self.private_y,
            cfg.private_epochs,
            rng,
            ticker,
            "private",
        )
        if len(self.holdout[1]):
            self.kept_validation = self._accuracy(self.model, *self.holdout, self.private_mean)[0]
        accuracy, test_loss = self._accuracy(self.model, self.test_x, self.test_y, self.private_mean)
        return {
            "accuracy": accuracy,
            "loss": test_loss,
            "train_loss": loss,
            "public_accuracy": public_acc,
            "public_epochs": public_epochs,
            "private_epochs": private_epochs,
        }

    def communicate(self, indices: np.ndarray, round_: int) -> np.ndarray | dict:
        """Class scores on the round's public subset, as they leave this participant
        (corrupted if it is an adversary, privatised, encoded). Changes nothing here."""
        self.maybe_fail(Phase.COMMUNICATE, round_)
        rng = self._seed(Phase.COMMUNICATE, round_)
        scores = self._scores(self.model, self.public_x[indices], self.public_mean)
        return self.send(scores.float().cpu().numpy(), rng)

    def send(self, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray | dict:
        """Scores as they leave this participant: corrupted (an adversary), privatised,
        encoded, drawing on the call's `rng`."""
        out = self.spec.sharing
        if self.spec.adversary:
            scores = sharing.corrupt(scores, out.attack, out.attack_scale, rng)
        if out.clip is not None:
            noise_rng = rng if out.noise_seed == "config" else np.random.default_rng()  # OS entropy
            scores = sharing.privatise(scores, out.clip, out.noise_multiplier, noise_rng)
        return sharing.encode(scores, out.payload, out.topk)

    def digest(self, consensus: np.ndarray, indices: np.ndarray, round_: int) -> dict:
        """Digest: train towards the consensus on the public subset."""
        self.maybe_fail(Phase.DIGEST, round_)
        rng = self._seed(Phase.DIGEST, round_)
        if len(self.holdout[1]):
            self.round_start = self._training_state()  # the safeguard may go back to it
        x = prepare(self.public_x[indices], self.device, self.public_mean)
        target = torch.from_numpy(np.array(consensus, dtype=np.float32)).to(self.device)
        cfg = self.cfg
        loss = float("nan")
        for _ in range(cfg.digest_epochs):
            loss = self._fit(
                self.model, self.digest_opt, x, target, cfg.digest_batch_size, rng, self.digest_fn
            )
        return {"loss": loss, "bytes_received": int(consensus.nbytes)}

    def revisit(self, round_: int) -> dict:
        """Revisit: a few epochs on the private data."""
        self.maybe_fail(Phase.REVISIT, round_)
        rng = self._seed(Phase.REVISIT, round_)
        loss = float("nan")
        for _ in range(self.cfg.revisit_epochs):
            loss = self._fit(
                self.model,
                self.private_opt,
                self.private_x,
                self.private_y,
                self.cfg.revisit_batch_size,
                rng,
                F.cross_entropy,
            )
        return {"loss": loss, **self._safeguard()}

    def _safeguard(self) -> dict:
        """With train.safeguard_holdout: keep the round's update (digest and revisit) only if
        the held-out accuracy has not fallen more than safeguard_tolerance below the best kept
        so far; otherwise go back to the model the round started from."""
        if not len(self.holdout[1]) or self.round_start is None:
            return {}
        validation = self._accuracy(self.model, *self.holdout, self.private_mean)[0]
        kept = validation >= self.kept_validation - self.cfg.safeguard_tolerance
        if kept:
            self.kept_validation = max(self.kept_validation, validation)
        else:
            self._restore_training_state(self.round_start)
        self.round_start = None
        return {"validation": validation, "kept": kept, "kept_validation": self.kept_validation}

    def evaluate(self, round_: int = 0) -> dict:
        self.maybe_fail(Phase.EVALUATE, round_)
        accuracy, loss = self._accuracy(self.model, self.test_x, self.test_y, self.private_mean)
        return {"accuracy": accuracy, "loss": loss}

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> dict:
        """The paper's upper bound: this architecture, from its public-pretrained weights,
        trained on every participant's private data pooled. Leaves the FedMD model untouched
        and lets the public weights go: nothing needs them after this."""
        if self.public_state is None:
            raise RuntimeError("upper_bound() needs transfer() first, with train.upper_bound on")
        rng = self._seed(Phase.UPPER_BOUND)
        model = self._build()
        model.load_state_dict(self.public_state)
        self.public_state = None
        model.to(self.device)
        opt = self._optimizer(model)
        x = prepare(pooled_x, self.device, self.private_mean)
        y = torch.from_numpy(np.array(pooled_y, dtype=np.int64)).to(self.device)  # a writable copy
        epochs = self.cfg.upper_bound_epochs
        ticker = _Ticker(self.report, self.name, Phase.UPPER_BOUND, epochs * len(y))
        loss, trained = self._train_private(model, opt, x, y, epochs, rng, ticker, "pooled")
        self._recompute_batchnorm(model, x, None)  # x is prepared already
        accuracy, test_loss = self._accuracy(model, self.test_x, self.test_y, self.private_mean)
        return {
            "accuracy": accuracy,
            "loss": test_loss,
            "train_loss": loss,
            "epochs": trained,
        }

    def _train_private(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int,
        rng: np.random.Generator,
        ticker: _Ticker,
        label: str,
    ) -> tuple[float, int]:
        """Up to `epochs` epochs at the private batch size; with train.private_patience, stop
        as the authors' Keras EarlyStopping did (test accuracy not improved by
        private_min_delta for that many epochs; the last weights are kept, as theirs were).
        Returns (last training loss, epochs trained)."""
        cfg = self.cfg
        loss, best, stale = float("nan"), -1.0, 0
        for epoch in range(1, epochs + 1):
            ticker.advance(text=f"{label} epoch {epoch}/{epochs}")
            loss = self._fit(model, opt, x, y, cfg.private_batch_size, rng, F.cross_entropy, ticker)
            if cfg.private_patience is None:
                continue
            accuracy, _ = self._accuracy(model, self.test_x, self.test_y, self.private_mean)
            if accuracy > best + cfg.private_min_delta:
                best, stale = accuracy, 0
            else:
                stale += 1
                if stale >= cfg.private_patience:
                    ticker.total -= (epochs - epoch) * len(y)
                    ticker.advance(text=f"{label}: early stop after epoch {epoch}", force=True)
                    return loss, epoch
        return loss, epochs
