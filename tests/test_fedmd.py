"""End-to-end FedMD runs on real (local) Ray and the local backend, synthetic data."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fedmd_ray import run
from fedmd_ray.errors import ConfigError, ConsensusError, ParticipantError, ResourceError
from fedmd_ray.fedmd import participant_device
from fedmd_ray.phases import Phase
from fedmd_ray.procfs import status_bytes
from fedmd_ray.tasks import build_task
from tests.conftest import numbers, tiny_config

PHASES = set(Phase) - {Phase.SETUP, Phase.RESUME}  # every phase a fresh run records


def _accuracies(result):
    rows = [r for r in result.metrics.to_pylist() if r["accuracy"] is not None]
    return [(r["round"], r["participant"], r["phase"], r["accuracy"]) for r in rows]


@pytest.mark.slow
def test_ray_run_writes_every_result(ray_session, out_dir):
    config = tiny_config(
        models=["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "shufflenet_v2_x0_5"],
        resources={"backend": "ray"},
        train={"rounds": 3},
    )
    result = run(config, out_dir, progress=None)
    table = pq.read_table(out_dir / "metrics.parquet").to_pylist()
    assert {r["phase"] for r in table} == PHASES
    evaluated = [r for r in table if r["phase"] == Phase.EVALUATE]
    assert sorted({r["round"] for r in evaluated}) == [1, 2, 3]
    assert len(evaluated) == 3 * 3 and all(0 <= r["accuracy"] <= 1 for r in evaluated)
    # Every participant sends its 300 x 16 float32 scores and receives the consensus.
    sent = [r for r in table if r["phase"] == Phase.COMMUNICATE and r["participant"] != "*"]
    received = [r for r in table if r["phase"] == Phase.DIGEST]
    assert len(sent) == len(received) == 3 * 3
    assert all(r["bytes_sent"] == 300 * 16 * 4 and r["seconds"] > 0 for r in sent)
    assert all(r["bytes_received"] == 300 * 16 * 4 for r in received)
    for name in (
        "config.json",
        "partition.json",
        "participants.json",
        "summary.md",
        "summary.json",
        "accuracy.png",
    ):
        assert (out_dir / name).stat().st_size > 0
    assert {r.model for r in result.summary} == set(config.models)
    assert "| **mean** |" in (out_dir / "summary.md").read_text()


def test_digest_pulls_every_participant_towards_the_consensus():
    from fedmd_ray.backends.local import LocalBackend
    from fedmd_ray.fedmd import participant_specs
    from fedmd_ray.plans import RoundPlan, public_subset
    from fedmd_ray.protocol import ConsensusPlan
    from fedmd_ray.tasks import build_task

    # About 60 optimiser steps: the paper's digest is 20 per round (5000 samples, batch 256);
    # a handful is not enough for train-mode batch norm to settle. Scores are read in eval
    # mode, through BatchNorm's running statistics: torch's momentum (0.1) lets them follow
    # within these steps, Keras' (0.01, the default) needs about ten times more.
    # No revisit: the private epochs after the digest would pull each model elsewhere.
    config = tiny_config(
        train={"digest_batch_size": 32, "digest_epochs": 6, "batchnorm": "torch", "revisit_epochs": 0}
    )
    task = build_task(config)
    backend = LocalBackend(config, task, participant_specs(config, task))
    backend.transfer()
    plan = RoundPlan(1, public_subset(np.random.default_rng(0), task.public_train.y, 300), [0, 1, 2])
    scores = backend.communicate(plan)
    before = list(scores.payloads)
    consensus = backend.aggregate(scores, ConsensusPlan("mean"))
    assert scores.payloads == []  # aggregation releases the scores
    backend.update(scores, consensus, [], None)
    after = backend.communicate(plan).payloads
    for b, a in zip(before, after):
        assert np.abs(a - consensus).mean() < 0.8 * np.abs(b - consensus).mean()


def test_the_consensus_changes_the_run():
    with_consensus = run(tiny_config(), progress=None)
    alone = run(tiny_config(train={"digest_epochs": 0}), progress=None)
    # Same transfer learning, so the same lower bounds, but different models after the rounds.
    assert [r.lower_bound for r in with_consensus.summary] == [r.lower_bound for r in alone.summary]
    assert [r.fedmd_final for r in with_consensus.summary] != [r.fedmd_final for r in alone.summary]


def test_run_takes_a_config_or_its_values_and_names_anything_else():
    config = tiny_config(train={"rounds": 1})
    as_config, as_values = run(config, progress=None), run(config.to_dict(), progress=None)
    assert numbers(as_values.metrics.to_pylist()) == numbers(as_config.metrics.to_pylist())
    with pytest.raises(ConfigError, match=r"run\(\) takes a Config or a dict of config values, not str"):
        run("smoke", progress=None)
    with pytest.raises(
        ConfigError, match=r"run\(\)'s progress must be a function \(e.g. progress=print\) or None, not str"
    ):
        run(config, progress="plain")
    with pytest.raises(ConfigError, match=r"run\(\)'s on_round must be a function .* not int"):
        run(config, progress=None, on_round=3)


def test_the_same_config_gives_the_same_numbers_on_the_defaults(ray_session):
    """Threads, order and timing are not inputs: with the default resources (threads from
    the cores, more participants than cores) the local loop, Ray, and Ray with participants
    made late by seconds in the middle of a round compute the same numbers."""
    # Kept actors compute what fresh ones do (test_kept_actors_...): the second Ray run
    # takes the first one's.
    defaults = {"torch_threads": None}
    local = run(tiny_config(resources=defaults), progress=None)
    on_ray = run(tiny_config(resources={**defaults, "backend": "ray"}), progress=None)
    disturbed = run(
        tiny_config(
            resources={**defaults, "backend": "ray"}, faults=["1:digest:1:sleep2", "2:communicate:2:sleep1"]
        ),
        progress=None,
    )
    assert numbers(on_ray.metrics.to_pylist()) == numbers(local.metrics.to_pylist())
    assert numbers(disturbed.metrics.to_pylist()) == numbers(local.metrics.to_pylist())
    other_seed = run(tiny_config(seed=1, resources=defaults), progress=None)
    assert _accuracies(local) != _accuracies(other_seed)


@pytest.mark.slow
def test_kept_actors_compute_what_fresh_ones_do(ray_session, tmp_path):
    """resources.reuse_actors: the second run takes the first run's actor processes, and
    both compute the local loop's numbers."""
    config = tiny_config(resources={"backend": "ray", "reuse_actors": True})
    first = run(config, tmp_path / "first", progress=None)
    second = run(config, tmp_path / "second", progress=None)
    pids = [
        [d["pid"] for d in json.loads((tmp_path / r / "participants.json").read_text())]
        for r in ("first", "second")
    ]
    assert sorted(pids[0]) == sorted(pids[1])
    local = run(tiny_config(), progress=None)
    assert (
        numbers(first.metrics.to_pylist())
        == numbers(second.metrics.to_pylist())
        == numbers(local.metrics.to_pylist())
    )


SCRATCH_MODEL = """
import torch
from torch import nn

forwards = [0]


class Scratchy(nn.Module):
    # A linear model whose fifth forward pass (in transfer learning) also fills, then frees,
    # a 512 MiB scratch tensor: the peak a call leaves behind in the process.
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        forwards[0] += 1
        if forwards[0] == 5:
            x = x + torch.ones(128 * 2**20)[:1] * 0
        return self.body(x)


def make(image_shape, num_classes):
    return Scratchy(num_classes)
"""


@pytest.mark.slow
@pytest.mark.parametrize("turns", [True, False], ids=["taking-turns", "all-at-once"])
def test_actors_that_take_turns_on_the_cores_give_freed_memory_back(ray_session, tmp_path, turns):
    """Three actors on two cores take turns (the dispatcher's window): between its calls an
    actor holds its participant, not the memory its last call freed. Where all compute at
    once (resources.max_concurrent=3) they keep it for their next call, as the allocator is
    told to (heap.py): which also shows this test sees the memory it means."""
    (tmp_path / "scratchy.py").write_text(SCRATCH_MODEL)
    model = f"{tmp_path / 'scratchy.py'}:make"
    config = tiny_config(
        models=[model] * 3,
        train={"rounds": 1},
        resources={"backend": "ray", "reuse_actors": False, "max_concurrent": None if turns else 3},
    )
    out = tmp_path / "run"
    held: list[int] = []

    def at_round_end(round_, summary):
        pids = [d["pid"] for d in json.loads((out / "participants.json").read_text())]
        held.extend(status_bytes("RssAnon", pid) for pid in pids)

    @ray_session.remote(num_cpus=0)
    class Bare:  # an actor process with the same imports, and no participant
        def anon(self):
            import fedmd_ray.backends.actors  # noqa: F401
            import fedmd_ray.participant  # noqa: F401

            return status_bytes("RssAnon")

    bare = Bare.remote()
    base = ray_session.get(bare.anon.remote())
    ray_session.kill(bare)
    run(config, out, progress=None, on_round=at_round_end)
    assert len(held) == 3 and base
    mib = [round((h - base) / 2**20) for h in held]  # above an actor with no participant
    if turns:
        assert max(mib) < 200, mib
    else:
        assert min(mib) > 400, mib


@pytest.mark.slow
def test_fractional_gpus_are_placed(ray_session, out_dir):
    """Ray was started with one fake GPU: four participants at 0.25 share it."""
    config = tiny_config(
        models=["cnn2:8,16,0.1"] * 4,
        resources={"backend": "ray", "num_gpus": 0.25},
        train={"rounds": 1, "upper_bound": False},
    )
    result = run(config, out_dir, progress=None)
    assert len(result.summary) == 4
    info = json.loads((out_dir / "participants.json").read_text())
    assert [d["visible_gpus"] for d in info] == ["0"] * 4  # Ray pinned each actor to GPU 0
    assert json.loads((out_dir / "placement.json").read_text())["num_gpus"] == 0.25
    too_many = tiny_config(models=["cnn2:8,16,0.1"] * 5, resources={"backend": "ray", "num_gpus": 0.25})
    with pytest.raises(
        ResourceError, match=r"5 participants x 0.25 GPU need 1.25 GPUs; the Ray cluster has 1"
    ):
        run(too_many, progress=None)
    with pytest.raises(ResourceError, match="need 9 CPUs; the Ray cluster has 2"):
        run(tiny_config(resources={"backend": "ray", "num_cpus": 3}), progress=None)


def test_each_model_gets_its_own_share_and_the_same_numbers(ray_session, out_dir):
    """resources.per_model: the cnn3 takes half the (fake) GPU, each cnn2 a quarter, by name
    or by the spec as written; Ray gives each actor that share, placement.json records it,
    and the numbers are those of the run without it (the shares move work, not arithmetic)."""
    models = ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2"]
    per_model = {"cnn3:8,16,16,0.1": {"num_gpus": 0.5}, "cnn2": {"num_gpus": 0.25}}
    train = {"rounds": 1, "upper_bound": False}
    config = tiny_config(models=models, resources={"backend": "ray", "per_model": per_model}, train=train)
    result = run(config, out_dir, progress=None)
    info = json.loads((out_dir / "participants.json").read_text())
    assert [d["gpu_share"] for d in info] == [0.25, 0.5, 0.25]
    placement = json.loads((out_dir / "placement.json").read_text())
    assert [(p["model"], p["num_gpus"]) for p in placement["per_participant"]] == list(
        zip(models, [0.25, 0.5, 0.25])
    )
    plain = run(tiny_config(models=models, train=train), progress=None)
    assert numbers(result.metrics.to_pylist()) == numbers(plain.metrics.to_pylist())
    over = {"cnn3": {"num_gpus": 1}, "cnn2": {"num_gpus": 0.25}}
    with pytest.raises(ResourceError, match=r"GPU shares .* add up to 1.5 GPUs \(cnn3:8,16,16,0.1 1, "):
        run(tiny_config(models=models, resources={"backend": "ray", "per_model": over}), progress=None)
    with pytest.raises(ConfigError, match="names 'resnet18', which no participant's model is"):
        tiny_config(resources={"per_model": {"resnet18": {"num_gpus": 0.5}}})
    with pytest.raises(ConfigError, match="with 'resources.actors' a pool of equal actors"):
        tiny_config(resources={"actors": 1, "per_model": {"cnn2": {"num_gpus": 0.5}}})


def test_a_participant_computes_on_cuda_only_with_a_gpu_share():
    """Ray 2.60 leaves every GPU visible to an actor given none, and the local backend sees
    them all: 'auto' must follow the participant's share, not what torch can see, or a CPU
    run's config computes on GPU 0 of a GPU machine."""
    models = ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1"]
    auto = {"device": "auto"}  # the tests' own config computes on the CPU wherever it runs
    assert participant_device(tiny_config(models=models, resources=auto), models[0]) == "cpu"
    assert (
        participant_device(tiny_config(models=models, resources={**auto, "num_gpus": 0.1}), models[0])
        == "auto"
    )
    mixed = tiny_config(
        models=models, resources={**auto, "backend": "ray", "per_model": {"cnn3": {"num_gpus": 0.5}}}
    )
    assert [participant_device(mixed, m) for m in models] == ["cpu", "auto"]
    assert participant_device(tiny_config(resources={"device": "cpu", "num_gpus": 0.1}), models[0]) == "cpu"
    assert (
        participant_device(tiny_config(resources={"device": "cuda"}), models[0]) == "cuda"
    )  # local: as asked
    with pytest.raises(ConfigError, match=r"'cuda' but cnn2:8,16,0.1 has no GPU share on the ray backend"):
        tiny_config(
            models=models,
            resources={"backend": "ray", "device": "cuda", "per_model": {"cnn3": {"num_gpus": 0.5}}},
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch has no CUDA device")
def test_cuda_asked_for_where_there_is_none_is_refused_by_name(out_dir):
    config = tiny_config(resources={"backend": "local", "device": "cuda"})
    with pytest.raises(
        ConfigError, match=r"p00-cnn2: resources.device is 'cuda' but torch finds no CUDA device"
    ):
        run(config, out_dir, progress=None)


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("phase", ["digest", "communicate"])
def test_a_failing_participant_stops_the_run_by_name_and_keeps_results(ray_session, out_dir, backend, phase):
    """Round 2 fails; all of round 1 is written. On Ray round 2's scores are computed with
    round 1's last steps, and a failure there still stops the run in round 2's communicate,
    as on the local backend."""
    config = tiny_config(faults=[f"1:{phase}:2"], resources={"backend": backend}, train={"rounds": 3})
    with pytest.raises(ParticipantError) as info:
        run(config, out_dir, progress=None)
    assert f"Participant 'p01-cnn3' failed during {phase}" in str(info.value)
    assert f"simulated fault in {phase} of round 2" in str(info.value)
    rows = pq.read_table(out_dir / "metrics.parquet").to_pylist()
    assert {r["round"] for r in rows if r["phase"] == Phase.EVALUATE} == {1}
    assert {r["participant"] for r in rows if r["round"] == 1 and r["phase"] == Phase.EVALUATE} == {
        "p00-cnn2",
        "p01-cnn3",
        "p02-cnn2",
    }
    assert "Incomplete run" in (out_dir / "summary.md").read_text()


@pytest.mark.parametrize("actors", [None, 2])
def test_a_failure_is_said_once_without_rays_unhandled_error_tracebacks(ray_session, capfd, caplog, actors):
    """Every participant fails in the same step: the run stops naming the first, and the
    other failed calls' answers, and the failing call's own scores, are never read. Ray
    prints any error it holds that nobody read, with the participant's traceback, when its
    object is freed: the run must have read them."""
    import gc
    import time

    faults = [f"{i}:communicate:1" for i in range(3)]
    config = tiny_config(faults=faults, resources={"backend": "ray", "actors": actors})
    with pytest.raises(ParticipantError, match="simulated fault in communicate of round 1"):
        run(config, progress=None)
    gc.collect()
    time.sleep(1.5)  # Ray reports an unread error from its own thread once the object is freed
    assert "Unhandled error" not in capfd.readouterr().err + caplog.text


def test_a_dead_actor_is_reported_by_name(ray_session, out_dir):
    config = tiny_config(faults=["2:revisit:1:exit"], resources={"backend": "ray", "max_restarts": 0})
    with pytest.raises(ParticipantError, match="'p02-cnn2' failed during revisit: its actor process died"):
        run(config, out_dir, progress=None)
    assert (out_dir / "metrics.parquet").exists()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_diverged_scores_are_refused_with_the_participant_named(ray_session, backend):
    config = tiny_config(
        train={"lr": 1e30, "optimizer": "sgd", "public_epochs": 1}, resources={"backend": backend}
    )
    with pytest.raises(ConsensusError, match="sent NaN or infinite scores.*lower train.lr"):
        run(config, progress=None)


def test_models_no_better_than_guessing_are_pointed_out(out_dir):
    """Who ends transfer learning, or the run, at or below chance on the private task is
    named as it happens and in summary.md, and nobody else: a learning rate that wrecks
    training without overflowing (finite, huge losses) names everyone; the tiny config's
    small cnn3, trained too briefly, names it alone."""
    said = []
    run(tiny_config(train={"lr": 1e6, "rounds": 1}), out_dir, progress=said.append)
    warnings = [line for line in said if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and "p00-cnn2, p01-cnn3, p02-cnn2: 16.7 % or less on the private task" in warnings[0]
    )
    assert "train.lr" in warnings[0]
    said.clear()
    result = run(tiny_config(train={"rounds": 1}), out_dir, progress=said.append)
    chance = 1 / 6
    lower = [r.participant for r in result.summary if r.lower_bound <= chance]
    final = [r.participant for r in result.summary if r.fedmd_final <= chance]
    assert lower and len(lower) < len(result.summary)  # some named, some not
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {', '.join(lower)}: 16.7 % or less")
    summary = (out_dir / "summary.md").read_text()
    line = next(line for line in summary.splitlines() if line.startswith("**No better than chance**"))
    assert line.startswith(f"**No better than chance**: {', '.join(final)}: 16.7 % or less")


def test_round_plans_are_fresh_each_round_and_depend_on_nothing_else():
    from fedmd_ray.plans import RoundPlans, public_subset

    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10
    a, b = public_subset(rng, labels, 300), public_subset(rng, labels, 300)
    assert len(a) == len(np.unique(a)) == 300 and not np.array_equal(a, b)
    assert len(public_subset(rng, labels[:100], 300)) == 100
    # A round's plan is the same whichever rounds were drawn before it (a resume, or a
    # backend that starts on the next round early, draws them out of order).
    plans, again = (
        RoundPlans(0, 5, 10, labels, 300, participation=0.5),
        RoundPlans(0, 5, 10, labels, 300, participation=0.5),
    )
    forward = [plans[r] for r in range(1, 6)]
    backward = [again[r] for r in range(5, 0, -1)][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(x.indices, y.indices) and x.chosen == y.chosen and len(x.chosen) == 5
    assert not np.array_equal(forward[0].indices, forward[1].indices)
    assert plans.after(forward[-1]) is None and plans.after(forward[0]).round == 2
    assert list(plans.releases(5)) == [sum(i in p.chosen for p in forward) for i in range(10)]


def test_public_subsets_are_stratified_by_class_like_the_authors_split():
    from fedmd_ray.plans import public_subset

    # 3 classes of 500, 300 and 200 samples: a 101-sample subset holds 50.5, 30.3, 20.2 of
    # them, rounded by largest remainder to 51, 30, 20 every time (uniform draws vary by +-5).
    labels = np.repeat([7, 2, 5], [500, 300, 200])
    np.random.default_rng(1).shuffle(labels)
    rng = np.random.default_rng(0)
    for _ in range(5):
        picked = labels[public_subset(rng, labels, 101)]
        assert {c: int((picked == c).sum()) for c in (7, 2, 5)} == {7: 51, 2: 30, 5: 20}
    uniform = [int((labels[public_subset(rng, labels, 101, stratified=False)] == 7).sum()) for _ in range(20)]
    assert len(set(uniform)) > 1


def test_digest_learning_rate_is_its_own_setting():
    same = run(tiny_config(train={"rounds": 1, "digest_lr": 1e-3}), progress=None)  # = train.lr
    default = run(tiny_config(train={"rounds": 1}), progress=None)
    faster = run(tiny_config(train={"rounds": 1, "digest_lr": 1e-2}), progress=None)
    assert _accuracies(same) == _accuracies(default)
    digest_loss = [r["loss"] for r in faster.metrics.to_pylist() if r["phase"] == Phase.DIGEST]
    assert digest_loss != [r["loss"] for r in default.metrics.to_pylist() if r["phase"] == Phase.DIGEST]


def test_a_subset_larger_than_the_public_data_is_reported_as_what_a_round_draws(out_dir):
    config = tiny_config(train={"rounds": 1, "upper_bound": False, "public_subset_size": 10**6})
    run(config, out_dir, progress=None)
    text = (out_dir / "summary.md").read_text()
    drawn = re.search(r"public subset (\d+) \(all the public data; train.public_subset_size=1000000\)", text)
    assert drawn and 0 < int(drawn.group(1)) < 10**6, text
    assert drawn.group(1) == str(len(build_task(config).public_train))
