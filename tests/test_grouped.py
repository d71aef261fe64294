"""Grouped participants (resources.group): members of one architecture stepping as one
stacked model compute, member by member, what each computes alone, up to floating-point
reordering; and a grouped pool run repeats for its seed.

The tolerance, TOL = 1e-5 on every weight, BatchNorm statistic, optimizer moment, score
and loss after two rounds, is what reordering leaves (measured ~1e-7 here). The controls
show it is tight: a swapped member, or a member stepping with another's optimizer state,
is off by orders of magnitude more."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fedmd_ray
from fedmd_ray import run
from fedmd_ray.checks import from_dict
from fedmd_ray.errors import ConfigError, Failed
from fedmd_ray.faults import parse_fault
from fedmd_ray.fedmd import participant_specs
from fedmd_ray.grouped import run_bundle
from fedmd_ray.participant import Participant, run_call
from fedmd_ray.phases import Phase
from fedmd_ray.tasks import build_task, participant_args
from tests.conftest import numbers, tiny_config

TOL = 1e-5


def _mlp(num_classes: int, image_shape: tuple, hidden: int = 24) -> nn.Module:
    """A user's model without BatchNorm, with dropout: grouped as it is."""
    width = int(np.prod(image_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, num_classes)
    )


fedmd_ray.register_model("grouped_mlp", _mlp)


class _ReadsOutInTraining(nn.Module):
    """A user's model that reads a number out while training (as a logger might): vmap runs
    its scores, so the probe passes, but not its training step."""

    def __init__(self, num_classes: int, image_shape: tuple):
        super().__init__()
        self.net = _mlp(num_classes, image_shape)
        self.largest = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.largest = max(self.largest, float(out.detach().abs().max()))
        return out


fedmd_ray.register_model("grouped_reads_out", _ReadsOutInTraining)


def _members(model: str, optimizer: str, count: int = 4) -> list[Participant]:
    """`count` participants of `model` after transfer learning, as a pool actor holds them."""
    config = tiny_config(
        models=[model],
        participants=count,
        data={"synthetic_image_size": 12},
        train={"optimizer": optimizer, "public_epochs": 1, "private_epochs": 2, "digest_batch_size": 32},
    )
    task = build_task(config)
    members = []
    for spec in participant_specs(config, task):
        spec.torch_threads = 1
        p = Participant(spec, task.public_train.x, task.public_train.y, *participant_args(task, spec.index))
        p.transfer()
        members.append(p)
    return members


def _rounds(members: list[Participant], together: bool, rounds: int = 2) -> list[list[tuple]]:
    """Two FedMD rounds (scores, digest on their mean, revisit, evaluation) for everyone:
    one at a time, or as a bundle. Returns each call's (metrics, payload) per member."""
    answers = []
    indices = np.arange(96)
    for r in range(1, rounds + 1):
        if together:
            scores = run_bundle(members, Phase.COMMUNICATE, (indices, r), True)
        else:
            scores = [run_call(p, Phase.COMMUNICATE, indices, r) for p in members]
        consensus = np.mean([payload for _, payload in scores], axis=0)
        answers.append(scores)
        for phase, args in (
            (Phase.DIGEST, (consensus, indices, r)),
            (Phase.REVISIT, (r,)),
            (Phase.EVALUATE, (r,)),
        ):
            if together:
                answers.append(run_bundle(members, phase, args, True))
            else:
                answers.append([run_call(p, phase, *args) for p in members])
    return answers


def _state(p: Participant) -> dict[str, torch.Tensor]:
    """Every tensor training changes: weights, buffers, both optimizers' moments."""
    out = {f"model.{k}": v.float() for k, v in p.model.state_dict().items()}
    for which in ("digest_opt", "private_opt"):
        opt = getattr(p, which)
        names = {id(t): n for n, t in p.model.named_parameters()}
        for t, state in opt.state.items():
            for k, v in state.items():
                out[f"{which}.{names[id(t)]}.{k}"] = v.float()
    return out


def _distance(a: Participant, b: Participant) -> float:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize(
    ("model", "optimizer"),
    [
        ("cnn2:6,8,0.2", "sgd"),  # the paper's CNN: BatchNorm and dropout
        ("cnn3:4,8,8,0.3", "sgd"),
        ("grouped_mlp", "adam"),  # a user's model, Adam's moments
    ],
)
def test_each_member_computes_what_it_computes_alone(model, optimizer):
    torch.manual_seed(0)
    alone = _members(model, optimizer)
    grouped = copy.deepcopy(alone)
    swapped_state = copy.deepcopy(alone)
    a = _rounds(alone, together=False)
    g = _rounds(grouped, together=True)
    for calls_alone, calls_grouped in zip(a, g):
        for (ma, pa), (mg, pg) in zip(calls_alone, calls_grouped):
            # really computed as one group (scores and evaluation: on a GPU only)
            assert mg.get("together", 1) == (len(alone) if "loss" in mg and "accuracy" not in mg else 1)
            for key in ("loss", "accuracy"):
                if key in ma:
                    assert abs(ma[key] - mg[key]) <= TOL, (key, ma[key], mg[key])
            if pa is not None:
                assert np.abs(pa - pg).max() <= TOL
    for p_alone, p_grouped in zip(alone, grouped):
        assert _distance(p_alone, p_grouped) <= TOL

    # Controls: what TOL must catch is far above it.
    assert _distance(alone[0], grouped[1]) > 1000 * TOL  # a swapped member
    first, second = swapped_state[0], swapped_state[1]  # member 0 stepping with member 1's optimizer
    first.private_opt.load_state_dict(second.private_opt.state_dict())
    first.digest_opt.load_state_dict(second.digest_opt.state_dict())
    _rounds(swapped_state, together=True)
    assert _distance(alone[0], swapped_state[0]) > 100 * TOL


def test_members_that_differ_run_apart_and_a_failing_member_fails_alone():
    members = _members("cnn2:6,8,0.2", "sgd", count=3)
    members[2].private_y = members[2].private_y[:-1]  # another private size: its own revisit
    members[2].private_x = members[2].private_x[:-1]
    answers = run_bundle(members, Phase.REVISIT, (1,), True)
    assert [m["together"] for m, _ in answers] == [2, 2, 1]

    members[1].spec.faults = (parse_fault("1:evaluate:1", 3),)
    answers = run_bundle(members, Phase.EVALUATE, (1,), True)
    assert isinstance(answers[1], Failed)
    assert "p01" in answers[1].text or "simulated" in answers[1].text.lower()
    assert all(isinstance(answers[k], tuple) and answers[k][0]["accuracy"] >= 0 for k in (0, 2))


def test_a_stacked_step_that_fails_falls_back_to_each_member_alone():
    from fedmd_ray import grouped

    members = _members("grouped_reads_out", "sgd", count=3)
    alone = copy.deepcopy(members)
    indices = np.arange(96)
    consensus = np.mean([run_call(p, Phase.COMMUNICATE, indices, 1)[1] for p in alone], axis=0)
    try:
        for phase, args in ((Phase.DIGEST, (consensus, indices, 1)), (Phase.REVISIT, (1,))):
            answers = run_bundle(members, phase, args, True)
            expected = [run_call(p, phase, *args) for p in alone]
            assert [m["together"] for m, _ in answers] == [1, 1, 1]
            assert [m["loss"] for m, _ in answers] == [m["loss"] for m, _ in expected]
        assert "grouped_reads_out" in grouped._CANNOT  # not stacked again in this process
        assert not any(p.restored for p in members)  # their simulated faults still fire later
        for p, q in zip(members, alone):
            assert _distance(p, q) == 0.0  # the failed stack changed nobody
    finally:
        grouped._CANNOT.discard("grouped_reads_out")


def test_group_needs_a_pool():
    with pytest.raises(ConfigError, match="resources.actors"):
        from_dict({**tiny_config().to_dict(), "resources": {"backend": "ray", "group": True}})
    with pytest.raises(ConfigError, match="true or false"):
        tiny_config(resources={"backend": "ray", "actors": 1, "group": "maybe"})


@pytest.mark.slow
def test_a_grouped_pool_run_repeats_for_its_seed_and_stays_near_the_ungrouped_one(ray_session, tmp_path):
    models = ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1"]
    settings = {"models": models, "participants": 8, "train": {"rounds": 2}}
    grouped = {"backend": "ray", "actors": 2, "group": True}
    first = run(tiny_config(**settings, resources=grouped), tmp_path / "a", progress=None)
    second = run(tiny_config(**settings, resources=grouped), progress=None)
    plain = run(tiny_config(**settings), progress=None)  # the local loop, one at a time
    assert numbers(first.metrics.to_pylist()) == numbers(second.metrics.to_pylist())
    rows = first.metrics.to_pylist()
    # Actor 0 serves the four cnn2s, actor 1 the four cnn3s: groups of four (scores and
    # evaluation run one at a time on a CPU).
    together = {(r["phase"], r["together"]) for r in rows if r["participant"] != "*" and r["together"]}
    assert together == {("digest", 4), ("revisit", 4)}
    for g, p in zip(first.summary, plain.summary):
        assert abs(g.fedmd_final - p.fedmd_final) < 0.1
        assert g.lower_bound == p.lower_bound  # transfer learning is never grouped
    text = (tmp_path / "a" / "summary.md").read_text()
    assert "**Grouped** (resources.group)" in text and "32 of 32 such calls ran in a group." in text


def test_a_grouped_run_resumes_only_on_a_pool_of_its_size():
    """Which participants compute together follows the pool's size, so with grouping on the
    pool's size is part of what a resume must keep (without it, it is free to change)."""
    from fedmd_ray.checkpoint import identity

    def of(actors: int, group: bool) -> dict:
        return identity(tiny_config(resources={"backend": "ray", "actors": actors, "group": group}), 1)

    assert of(1, True) != of(2, True)
    assert of(1, False) == of(2, False)
