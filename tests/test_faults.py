"""Failures a long run must survive: a participant's actor dying mid-round (restarted from
its last round's state, same final numbers) and the driver stopping (resumed from the run
directory's checkpoint, same final numbers)."""

import threading
import time

import pyarrow.parquet as pq
import pytest

from fedmd_ray import run
from fedmd_ray.errors import CheckpointError, ParticipantError
from tests.conftest import numbers, tiny_config


@pytest.mark.slow
def test_an_actor_killed_mid_round_is_restarted_and_the_run_ends_the_same(ray_session):
    undisturbed = run(tiny_config(resources={"backend": "ray"}, train={"rounds": 3}), progress=None)
    crashed = run(
        tiny_config(resources={"backend": "ray"}, train={"rounds": 3}, faults=["1:digest:2:exit"]),
        progress=None,
    )
    assert numbers(crashed.metrics.to_pylist()) == numbers(undisturbed.metrics.to_pylist())
    notes = [
        (r["round"], r["participant"], r["phase"], r["note"])
        for r in crashed.metrics.to_pylist()
        if r["note"]
    ]
    assert notes == [(2, "p01-cnn3", "digest", "restarted (actor died)")]
    assert crashed.summary == undisturbed.summary  # bytes per round included


@pytest.mark.slow
def test_ray_kill_from_outside_during_a_round(ray_session):
    """The driver's view of an actor killed by someone else (an OOM killer, an operator)."""
    undisturbed = run(tiny_config(resources={"backend": "ray"}, train={"rounds": 3}), progress=None)

    def kill_during_round_2(round_, _evaluated):
        if round_ != 1:
            return

        def kill():
            time.sleep(1.0)  # round 2 is under way: p01 spends 5 s in its digest
            name = next(n for n in ray_session.util.list_named_actors() if n.endswith("/p01-cnn3"))
            ray_session.kill(ray_session.get_actor(name), no_restart=True)

        threading.Thread(target=kill, daemon=True).start()

    config = tiny_config(resources={"backend": "ray"}, train={"rounds": 3}, faults=["1:digest:2:sleep5"])
    killed = run(config, progress=None, on_round=kill_during_round_2)
    assert numbers(killed.metrics.to_pylist()) == numbers(undisturbed.metrics.to_pylist())
    restarted = [r for r in killed.metrics.to_pylist() if r["note"] and r["note"].startswith("restarted")]
    assert [(r["round"], r["participant"]) for r in restarted] == [(2, "p01-cnn3")]


def test_restarts_are_bounded(ray_session):
    config = tiny_config(resources={"backend": "ray", "max_restarts": 0}, faults=["0:revisit:1:exit"])
    with pytest.raises(ParticipantError, match=r"'p00-cnn2' failed during revisit.*max_restarts=0"):
        run(config, progress=None)


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_the_same(ray_session, tmp_path, backend):
    settings = {"resources": {"backend": backend}, "train": {"rounds": 3}}
    whole = run(tiny_config(**settings), tmp_path / "whole", progress=None)

    out = tmp_path / "stopped"
    with pytest.raises(ParticipantError):  # the driver stops in round 3
        run(tiny_config(**settings, faults=["2:revisit:3"]), out, progress=None)
    assert (out / "checkpoint" / "latest.json").exists()
    resumed = run(tiny_config(**settings), out, progress=None, resume=True)
    assert numbers(resumed.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())
    assert numbers(pq.read_table(out / "metrics.parquet").to_pylist()) == numbers(whole.metrics.to_pylist())
    assert [r["fedmd_final"] for r in resumed.summary] == [r["fedmd_final"] for r in whole.summary]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest.json", "round-0003"]


def test_a_resume_can_add_rounds(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 1}), out, progress=None)
    longer = run(tiny_config(train={"rounds": 3}), out, progress=None, resume=True)
    whole = run(tiny_config(train={"rounds": 3}), progress=None)
    assert numbers(longer.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())


def test_mismatched_damaged_or_missing_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 1}), out, progress=None)
    with pytest.raises(CheckpointError, match=r"different configuration: train.lr \(0.001 -> 0.01\)"):
        run(tiny_config(train={"rounds": 2, "lr": 0.01}), out, progress=None, resume=True)
    state = out / "checkpoint" / "round-0001" / "p01-cnn3.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"p01-cnn3: checkpoint .*p01-cnn3.pt is damaged"):
        run(tiny_config(train={"rounds": 2}), out, progress=None, resume=True)
    with pytest.raises(CheckpointError, match=r"No checkpoint in .*nothing-here"):
        run(tiny_config(), tmp_path / "nothing-here", progress=None, resume=True)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_on_ray_as_on_local(ray_session, tmp_path):
    # The participant's own CheckpointError comes back through Ray as itself, not wrapped.
    out = tmp_path / "run"
    run(tiny_config(resources={"backend": "ray"}, train={"rounds": 1}), out, progress=None)
    state = out / "checkpoint" / "round-0001" / "p02-cnn2.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"^p02-cnn2: checkpoint .*p02-cnn2.pt is damaged"):
        run(tiny_config(resources={"backend": "ray"}, train={"rounds": 2}), out, progress=None, resume=True)
