"""Participants of one architecture taking a step together (resources.group).

A pool actor is handed its participants' calls in bundles (backends/slots.py). With
grouping on, the members of a bundle that share an architecture and everything else a
step depends on compute it as one model: their weights, BatchNorm statistics and optimizer
states stacked along a new first dimension (torch.func.stack_module_state), one vmap-ed
forward and backward for the whole group, one optimizer step over the stacked tensors.
Each member keeps its own data order (its own numpy generator), its own dropout masks (its
own torch generator, drawn exactly as nn.Dropout draws them on one participant), its own
BatchNorm statistics and its own optimizer moments: Adam and SGD are elementwise, so one
optimizer over stacked weights is each member's optimizer side by side.

Why vmap and not grouped convolutions written for the paper CNNs: it takes users' models
as they are (anything functional_call and vmap can run), and on the paper CNNs PyTorch's
batching rules turn it into grouped convolutions and batched matmuls anyway.

What a member computes equals what it computes alone up to floating-point reordering (the
batched kernels sum in another order), which is why grouping is a setting, off by default.
On, a run's numbers repeat for its seed (bundles are fixed by the participants' indices and
the pool's size), but they are not the one-at-a-time numbers bit for bit. On a CPU that
equivalence holds with dropout too (tests/test_grouped.py); on a GPU nn.Dropout alone draws
its masks with a fused kernel of its own, so there a grouped member's masks come from the
same seed but are drawn differently.

Computed one at a time instead (the call's metrics say `together` = 1): phases other than
digest and revisit (and, on a CPU, scores and evaluation: TOGETHER_ON_CPU says why);
members with the safeguard's holdout; a digest loss of the user's own (it may branch on
values, which vmap cannot); dropout other than nn.Dropout; a model vmap cannot run (found
on a probe batch before anything changes, or when its stacked step fails: the members then
take that step alone, as they were, and the model is not stacked again in that process).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fedmd_ray import sharing
from fedmd_ray.errors import Failed
from fedmd_ray.models import ShiftedAvgPool, shifted_avg_pool
from fedmd_ray.participant import (
    CPU_EVAL_BATCH_SIZE,
    EVAL_BATCH_SIZE,
    Participant,
    prepare,
    run_call,
    use_threads,
)
from fedmd_ray.phases import Phase
from fedmd_ray.plugins import BUILTIN_DIGEST_LOSSES

TOGETHER = (Phase.COMMUNICATE, Phase.DIGEST, Phase.REVISIT, Phase.EVALUATE)
TOGETHER_ON_CPU = (Phase.DIGEST, Phase.REVISIT)
"""On a CPU, scores and evaluation run one at a time: without an optimizer step there is
little per-member overhead to save, and vmap's batched convolutions were slower there
(tiny CNNs, 50 members: 6.3-8.7 ms a member grouped against 3.0 alone). On a GPU the
batched kernels are what fills the device."""
_OTHER_RANDOM = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CANNOT: set[str] = set()
"""Models found in this process that vmap cannot run: tried once, then one at a time."""


def run_bundle(members: Sequence[Participant], phase: Phase, args: tuple, together: bool) -> list:
    """Each member's (metrics, payload) for `phase`, or Failed: with `together`, groups of
    two or more members that may step together do; everyone else runs alone."""
    results: list[Any] = [None] * len(members)
    if together and phase in TOGETHER:
        groups: dict[tuple, list[int]] = {}
        for k, member in enumerate(members):
            key = group_key(member, phase)
            if key is not None:
                groups.setdefault(key, []).append(k)
        for ks in groups.values():
            if len(ks) >= 2:
                answers = _together([members[k] for k in ks], phase, args)
                for k, answer in zip(ks, answers or []):
                    results[k] = answer
    return [_alone(m, phase, args) if r is None else r for m, r in zip(members, results)]


def group_key(p: Participant, phase: Phase) -> tuple | None:
    """What members must share to take `phase` together; None: this one runs alone."""
    s, cfg = p.spec, p.cfg
    if phase not in phases_together(p.device):
        return None
    if len(p.holdout[1]) or s.model in _CANNOT:
        return None
    if phase == Phase.DIGEST and cfg.digest_loss not in BUILTIN_DIGEST_LOSSES:
        return None
    if any(isinstance(m, _OTHER_RANDOM) for m in p.model.modules()):
        return None
    opt = {Phase.DIGEST: p.digest_opt, Phase.REVISIT: p.private_opt}.get(phase)
    return (
        s.model,
        s.num_classes,
        tuple(s.image_shape),
        repr(cfg),
        str(p.device),
        s.torch_threads,
        _array_key(s.public_mean),
        _array_key(s.private_mean),
        len(p.private_y) if phase == Phase.REVISIT else None,
        None if opt is None else (type(opt).__name__, _steps(opt)),
    )


def phases_together(device: torch.device) -> tuple[Phase, ...]:
    """The phases members on `device` take together."""
    return TOGETHER if device.type == "cuda" else TOGETHER_ON_CPU


def _array_key(a: np.ndarray | None) -> Any:
    return None if a is None else hash(np.ascontiguousarray(a).tobytes())


def _steps(opt: torch.optim.Optimizer) -> tuple:
    """An optimizer's step counts: members step together only from the same count (Adam's
    bias correction depends on it)."""
    return tuple(sorted({float(s["step"]) for s in opt.state.values() if "step" in s})), len(opt.state)


class _MaskedDropout(nn.Module):
    """nn.Dropout with its mask handed in: a member's masks are drawn outside vmap, from the
    member's own generator, as nn.Dropout draws them (bernoulli, then divided by 1 - p).
    In eval mode it reports its input's shape while its stack is finding the shapes."""

    def __init__(self, p: float, stack: _Stack):
        super().__init__()
        self.p, self.stack = p, stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or not self.training:
            if self.stack.recorded is not None and 0 < self.p < 1:
                self.stack.recorded.append((self.p, tuple(x.shape)))
            return x
        if self.p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return x * self.stack.feed.pop(0)


class Unsupported(Exception):
    """vmap cannot run this model."""


class _Stack:
    """Members' models as one: stacked weights and buffers, and a weightless copy of the
    architecture (on the meta device) that functional_call runs them through."""

    def __init__(self, members: Sequence[Participant]):
        self.members = members
        self.device = members[0].device
        models = [m.model for m in members]
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.feed: list = []
        self.recorded: list | None = None
        self.drops = _swap_dropouts(self.base, self)
        _swap_pools(self.base)
        self._shapes: dict[int, list] = {}

    # -- running the stacked model

    def _one(self, params: dict, buffers: dict, masks: tuple, x: torch.Tensor) -> torch.Tensor:
        self.feed[:] = list(masks)
        return functional_call(self.base, (params, buffers), (x,))

    def scores(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Every member's scores: on the same inputs `x`, or member g on x[g] (eval mode)."""
        self.base.eval()
        shared = isinstance(x, torch.Tensor)
        run = vmap(self._one, in_dims=(0, 0, None, None if shared else 0))
        with torch.no_grad():
            return run(self.params, self.buffers, (), x if shared else torch.stack(list(x)))

    def losses(self, loss_fn, masks: tuple, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Each member's loss on its own batch (train mode), one vmap-ed forward."""
        self.base.train()

        def one(params, buffers, masks, x, y):
            return loss_fn(self._one(params, buffers, masks, x), y)

        return vmap(one)(self.params, self.buffers, masks, xb, yb)

    def probe(self, sample: torch.Tensor) -> None:
        """One vmap-ed forward on two samples, changing nothing: raises Unsupported where
        the model cannot be run this way."""
        try:
            self.scores(sample[:2])
        except Exception as exc:
            raise Unsupported(f"{type(exc).__name__}: {exc}") from None

    def masks(self, batch: int, generators: Sequence[torch.Generator]) -> tuple:
        """The dropout masks of one training forward, member by member from its generator, in
        the order the layers run (their shapes found once per batch size, in eval mode)."""
        if not self.drops:
            return ()
        if batch not in self._shapes:
            self.recorded = []
            with torch.no_grad():
                self.base.eval()
                one = {k: v[0] for k, v in self.params.items()}
                ones = {k: v[0] for k, v in self.buffers.items()}
                sample = torch.zeros((batch, *self.members[0].spec.image_shape), device=self.device)
                functional_call(self.base, (one, ones), (sample,))
            self._shapes[batch], self.recorded = self.recorded, None
        out = []
        for p, shape in self._shapes[batch]:
            out.append(
                torch.stack(
                    [
                        torch.empty(shape, device=self.device).bernoulli_(1 - p, generator=g).div_(1 - p)
                        for g in generators
                    ]
                )
            )
        return tuple(out)

    # -- optimizers and giving the results back

    def optimizer(self, opts: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """One optimizer over the stacked weights with the members' hyperparameters and
        their states stacked (every member's is the same kind, at the same step)."""
        names = {id(t): n for n, t in self.members[0].model.named_parameters()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [self.params[names[id(t)]] for t in g["params"]],
            }
            for g in opts[0].param_groups
        ]
        stacked = type(opts[0])(groups)
        for gi, group in enumerate(opts[0].param_groups):
            for j in range(len(group["params"])):
                states = [o.state.get(o.param_groups[gi]["params"][j]) for o in opts]
                if not states[0]:
                    continue
                weight = group["params"][j]
                stacked.state[stacked.param_groups[gi]["params"][j]] = {
                    k: torch.stack([s[k] for s in states]) if _per_weight(v, weight) else _copy(v)
                    for k, v in states[0].items()
                }
        return stacked

    def give_back(self, opts: Sequence[torch.optim.Optimizer], stacked: torch.optim.Optimizer | None) -> None:
        """Each member's slice of the weights, buffers and optimizer state, back into its own."""
        with torch.no_grad():
            for g, member in enumerate(self.members):
                for name, t in member.model.named_parameters():
                    t.copy_(self.params[name][g])
                for name, t in member.model.named_buffers():
                    t.copy_(self.buffers[name][g])
        if stacked is None:
            return
        for gi, group in enumerate(stacked.param_groups):
            for j, target in enumerate(group["params"]):
                state = stacked.state.get(target)
                if not state:
                    continue
                for g, opt in enumerate(opts):
                    opt.state[opt.param_groups[gi]["params"][j]] = {
                        k: v[g].clone() if _per_weight(v, target) else _copy(v) for k, v in state.items()
                    }


def _per_weight(v: Any, weight: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == weight.shape


def _copy(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)


class _SlicedPool(nn.Module):
    """AvgPool2d(2, stride=1) as shifted slices on every device (models.ShiftedAvgPool does
    so on a CPU only), for users' models too: on a group's stacked activations avg_pool2d's
    CPU kernel was a third of a digest, the slices 1.5x faster forward and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_avg_pool(x)


def _swap_pools(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is ShiftedAvgPool or (
            type(child) is nn.AvgPool2d
            and child.kernel_size in (2, (2, 2))
            and child.stride in (1, (1, 1))
            and child.padding in (0, (0, 0))
            and not child.ceil_mode
            and child.divisor_override is None
        ):
            setattr(module, name, _SlicedPool())
        else:
            _swap_pools(child)


def _swap_dropouts(module: nn.Module, stack: _Stack) -> list:
    """nn.Dropout layers replaced by masked ones (in place); returns them."""
    swapped = []
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            masked = _MaskedDropout(child.p, stack)
            setattr(module, name, masked)
            swapped.append(masked)
        else:
            swapped += _swap_dropouts(child, stack)
    return swapped


# ------------------------------------------------------------------ the phases, together


def _together(members: Sequence[Participant], phase: Phase, args: tuple) -> list | None:
    """Each member's (metrics, payload) or Failed; None when the model cannot be stacked
    (then nothing has changed and nobody's faults have fired: they run alone)."""
    first = members[0]
    use_threads(first.spec.torch_threads)
    try:
        stack = _Stack(members)
        stack.probe(prepare(first.public_x[:2], first.device, first.public_mean))
    except Exception:
        _CANNOT.add(first.spec.model)
        return None
    round_ = args[-1]
    answers: list[Any] = [None] * len(members)
    ready = []
    for g, member in enumerate(members):  # a member's simulated fault is its own
        try:
            member.maybe_fail(phase, round_)
            ready.append(g)
        except Exception as exc:
            answers[g] = Failed(exc)
    if len(ready) < len(members):
        if len(ready) >= 2:
            done = _together([members[g] for g in ready], phase, args)
            if done is not None:
                for g, answer in zip(ready, done):
                    answers[g] = answer
                return answers
        for g in ready:
            answers[g] = _alone(members[g], phase, args)
        return answers
    start = time.perf_counter()
    try:
        outs = _STEPS[phase](stack, members, *args)
    except Exception:
        # The stacked computation failed, which is no member's own doing (a model that
        # vmap runs for scores but not in training, say): the stack is a copy and the
        # members are as they were, so each runs alone, where an error is its own, and
        # this model is not stacked again in this process.
        _CANNOT.add(first.spec.model)
        return [_alone(m, phase, args, faults_fired=True) for m in members]
    seconds = (time.perf_counter() - start) / len(members)
    return [({**metrics, "seconds": seconds, "together": len(members)}, payload) for metrics, payload in outs]


def _alone(member: Participant, phase: Phase, args: tuple, faults_fired: bool = False) -> Any:
    """One member's call on its own. `faults_fired`: its simulated faults for this call have
    had their turn already (a stacked step that fell back), and a straggler's sleep is not
    slept twice."""
    restored = member.restored
    member.restored = restored or faults_fired  # a restored participant's faults do not fire
    try:
        metrics, payload = run_call(member, phase, *args)
        return ({**metrics, "together": 1} if phase in phases_together(member.device) else metrics), payload
    except Exception as exc:
        return Failed(exc)
    finally:
        member.restored = restored


def _communicate(stack: _Stack, members: Sequence[Participant], indices: np.ndarray, round_: int) -> list:
    first = members[0]
    scores = _chunked(stack, first.public_x[indices], first.public_mean)
    out = []
    for g, member in enumerate(members):
        rng = np.random.default_rng(member.seed_of(Phase.COMMUNICATE, round_))
        payload = member.send(scores[g].float().cpu().numpy(), rng)
        out.append(({"bytes_sent": sharing.nbytes(payload)}, payload))
    return out


def _evaluate(stack: _Stack, members: Sequence[Participant], round_: int = 0) -> list:
    first = members[0]
    scores = _chunked(stack, first.test_x, first.private_mean)
    out = []
    for g, member in enumerate(members):
        accuracy, loss = member.judge(scores[g], member.test_y)
        out.append(({"accuracy": accuracy, "loss": loss}, None))
    return out


def _chunked(stack: _Stack, x: np.ndarray, mean: torch.Tensor | None) -> torch.Tensor:
    """Every member's scores on `x`, in the chunks a participant alone uses."""
    step = EVAL_BATCH_SIZE if stack.device.type == "cuda" else CPU_EVAL_BATCH_SIZE
    parts = [stack.scores(prepare(x[s : s + step], stack.device, mean)) for s in range(0, len(x), step)]
    return torch.cat(parts, dim=1)


def _digest(
    stack: _Stack, members: Sequence[Participant], consensus: np.ndarray, indices: np.ndarray, round_: int
) -> list:
    first = members[0]
    x = prepare(first.public_x[indices], first.device, first.public_mean)
    target = torch.from_numpy(np.array(consensus, dtype=np.float32)).to(first.device)
    losses = _train(
        stack,
        [m.digest_opt for m in members],
        [x] * len(members),
        [target] * len(members),
        first.cfg.digest_batch_size,
        first.cfg.digest_epochs,
        [m.seed_of(Phase.DIGEST, round_) for m in members],
        first.digest_fn,
    )
    return [({"loss": loss, "bytes_received": int(consensus.nbytes)}, None) for loss in losses]


def _revisit(stack: _Stack, members: Sequence[Participant], round_: int) -> list:
    first = members[0]
    losses = _train(
        stack,
        [m.private_opt for m in members],
        [m.private_x for m in members],
        [m.private_y for m in members],
        first.cfg.revisit_batch_size,
        first.cfg.revisit_epochs,
        [m.seed_of(Phase.REVISIT, round_) for m in members],
        F.cross_entropy,
    )
    return [({"loss": loss}, None) for loss in losses]


def _train(
    stack: _Stack,
    opts: list,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    batch_size: int,
    epochs: int,
    seeds: list[int],
    loss_fn,
) -> list[float]:
    """`epochs` epochs of every member on its (x, y), each in its own order: Participant._fit
    member by member, as one model. Returns each member's mean loss in the last epoch."""
    device = stack.device
    rngs = [np.random.default_rng(s) for s in seeds]
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    optimizer = stack.optimizer(opts)
    n = len(ys[0])
    last = [float("nan")] * len(xs)
    for _ in range(epochs):
        orders = [rng.permutation(n) for rng in rngs]
        totals, count = [0.0] * len(xs), 0
        for start in range(0, n, batch_size):
            idx = [torch.as_tensor(o[start : start + batch_size], device=device) for o in orders]
            size = len(idx[0])
            if size < 2 and n >= 2:
                continue  # as Participant._fit: BatchNorm cannot train on one sample
            xb = torch.stack([x[i] for x, i in zip(xs, idx)])
            yb = torch.stack([y[i] for y, i in zip(ys, idx)])
            masks = stack.masks(size, generators)
            optimizer.zero_grad(set_to_none=True)
            losses = stack.losses(loss_fn, masks, xb, yb)
            losses.sum().backward()  # member g's weights get member g's gradient only
            optimizer.step()
            for g, value in enumerate(losses.detach().tolist()):
                totals[g] += value * size
            count += size
        last = [t / max(count, 1) for t in totals]
    stack.give_back(opts, optimizer)
    return last


_STEPS = {
    Phase.COMMUNICATE: _communicate,
    Phase.EVALUATE: _evaluate,
    Phase.DIGEST: _digest,
    Phase.REVISIT: _revisit,
}
