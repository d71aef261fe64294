"""More participants than actors: a pool of actors takes participants in turn, their state
(weights, optimizers) kept in the object store between calls and restored bit-exactly."""

import pytest

from fedmd_ray import run
from tests.conftest import numbers, tiny_config

FIVE = ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2", "cnn2:8,8,0.0", "cnn3:8,8,8,0.0"]


@pytest.mark.slow
def test_a_pool_of_two_actors_serves_five_participants_exactly(ray_session):
    """The same numbers as the local loop (and so as actors of their own: test_fedmd)."""
    settings = {"models": FIVE, "train": {"rounds": 2}}
    pooled = run(tiny_config(**settings, resources={"backend": "ray", "actors": 2}), progress=None)
    local = run(tiny_config(**settings), progress=None)
    assert len(pooled.summary) == 5
    assert numbers(pooled.metrics.to_pylist()) == numbers(local.metrics.to_pylist())


@pytest.mark.slow
def test_a_pool_actor_that_dies_is_replaced(ray_session, tmp_path):
    settings = {"models": FIVE, "train": {"rounds": 2}}
    undisturbed = run(tiny_config(**settings), progress=None)  # the local loop: the same numbers
    crashed = run(
        # Actor 1 serves p01 and p03: p01 kills it, and p03's call queued behind fails too.
        tiny_config(**settings, resources={"backend": "ray", "actors": 2}, faults=["1:digest:1:exit"]),
        tmp_path / "run",
        progress=None,
    )
    assert numbers(crashed.metrics.to_pylist()) == numbers(undisturbed.metrics.to_pylist())
    notes = [r["note"] for r in crashed.metrics.to_pylist() if r["note"]]
    # One death, one restart, whichever of the two failed calls the driver saw first.
    assert len(notes) == 1 and notes[0] in {
        f"restarted (pool actor 1 (serving {p}) died)" for p in ("p01-cnn3", "p03-cnn2")
    }
    assert f"- {notes[0]}: " in (tmp_path / "run" / "summary.md").read_text()
    # The pool's states also make a resumable checkpoint.
    longer = {"models": FIVE, "train": {"rounds": 3}, "resources": {"backend": "ray", "actors": 2}}
    resumed = run(tiny_config(**longer), tmp_path / "run", progress=None, resume=True)
    assert {r["round"] for r in resumed.metrics.to_pylist()} == {0, 1, 2, 3}


@pytest.mark.slow
def test_sampled_participants_on_a_pool_match_the_local_loop_through_a_crash(ray_session):
    """Three participants of one model on each of two actors: transfer learning sends whole
    bundles (their states come back packed as one object), rounds with half the
    participants sampled send part of a bundle (each state its own object). A pool actor
    dies in round 2 and its participants start again from states of both kinds."""
    settings = {
        "models": ["cnn2:8,8,0.0"] * 6,
        "train": {"rounds": 3, "participation": 0.5},
    }
    local = run(tiny_config(**settings), progress=None)
    pooled = run(
        tiny_config(
            **settings,
            resources={"backend": "ray", "actors": 2, "reuse_actors": False},
            faults=["1:revisit:2:exit", "3:revisit:2:exit", "5:revisit:2:exit"],
        ),
        progress=None,
    )
    assert numbers(pooled.metrics.to_pylist()) == numbers(local.metrics.to_pylist())
    assert any(r["note"] and "pool actor 1" in r["note"] for r in pooled.metrics.to_pylist())
