"""Who takes part in a round: a seeded fraction of participants, and stragglers that miss
the consensus when the driver stops waiting for them."""

import pyarrow.parquet as pq
import pytest

from fedmd_ray import run
from fedmd_ray.errors import ParticipantError
from fedmd_ray.plans import sample_participants
from tests.conftest import numbers, tiny_config


def test_participants_are_sampled_per_round_with_a_seed():
    rounds = [sample_participants(0, r, 10, 0.3) for r in range(1, 6)]
    assert all(len(chosen) == 3 and chosen == sorted(set(chosen)) for chosen in rounds)
    assert len({tuple(c) for c in rounds}) > 1  # a fresh draw each round
    assert rounds == [sample_participants(0, r, 10, 0.3) for r in range(1, 6)]
    assert sample_participants(0, 1, 10, 1.0) == list(range(10))
    assert sample_participants(0, 1, 3, 0.01) and len(sample_participants(0, 1, 3, 0.01)) == 1


def test_a_fraction_of_participants_per_round(ray_session):
    settings = {"train": {"rounds": 3, "participation": 0.67}}
    local = run(tiny_config(**settings), progress=None)
    on_ray = run(tiny_config(**settings, resources={"backend": "ray"}), progress=None)
    rows = local.metrics.to_pylist()
    for round_ in (1, 2, 3):
        chosen = {f"p{i:02d}" for i in sample_participants(0, round_, 3, 0.67)}
        digested = {r["participant"][:3] for r in rows if r["round"] == round_ and r["phase"] == "digest"}
        sat_out = {r["participant"][:3] for r in rows if r["round"] == round_ and r["note"] == "sat out"}
        evaluated = [r for r in rows if r["round"] == round_ and r["phase"] == "evaluate"]
        assert digested == chosen and len(chosen) == 2 and sat_out == {"p00", "p01", "p02"} - chosen
        assert len(evaluated) == 3  # those sitting out are still measured
    keep = ("round", "participant", "phase", "accuracy", "loss", "note")
    assert [{k: r[k] for k in keep} for r in rows if r["participant"] != "*"] == [
        {k: r[k] for k in keep} for r in on_ray.metrics.to_pylist() if r["participant"] != "*"
    ]


@pytest.mark.slow
def test_a_straggler_misses_the_consensus_and_is_recorded_late(ray_session):
    config = tiny_config(
        resources={"backend": "ray", "quorum": 0.6, "deadline_s": 1.0},
        train={"rounds": 5},
        faults=["2:communicate:2:sleep3"],
    )
    rows = run(config, progress=None).metrics.to_pylist()
    everyone = {"p00-cnn2", "p01-cnn3", "p02-cnn2"}
    late = {(r["round"], r["participant"]) for r in rows if r["note"] == "late"}
    assert (2, "p02-cnn2") in late and {name for _, name in late} == {"p02-cnn2"}
    for round_ in range(1, 6):
        missing = {name for r, name in late if r == round_}
        digested = {r["participant"] for r in rows if r["round"] == round_ and r["phase"] == "digest"}
        evaluated = {r["participant"] for r in rows if r["round"] == round_ and r["phase"] == "evaluate"}
        assert digested == evaluated == everyone - missing  # late ones sit the round out
    # Once its queue is through, the straggler takes part again.
    assert (5, "p02-cnn2") not in late
    consensus_bytes = {r["bytes_received"] for r in rows if r["round"] == 2 and r["phase"] == "digest"}
    assert consensus_bytes == {300 * 16 * 4}


@pytest.mark.slow
@pytest.mark.parametrize("actors", [None, 2], ids=["own-actors", "pool"])
def test_a_straggler_that_then_fails_stops_the_run_by_name(ray_session, tmp_path, capfd, actors):
    """p01 is late for round 1's consensus, then raises: the run goes on without it, and
    stops with its name and phase once the failure comes in (not silently, and without Ray's
    "Unhandled error" tracebacks); what was recorded before stays written."""
    config = tiny_config(
        resources={"backend": "ray", "quorum": 0.5, "deadline_s": 0.5, "actors": actors},
        train={"rounds": 3},
        faults=["1:communicate:1:sleep3", "1:communicate:1"],
    )
    out = tmp_path / "run"
    with pytest.raises(ParticipantError) as info:
        run(config, out, progress=None)
    assert "Participant 'p01-cnn3' failed during communicate" in str(info.value)
    assert "simulated fault in communicate of round 1" in str(info.value)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert {r["participant"] for r in rows if r["phase"] == "transfer"} == {
        "p00-cnn2",
        "p01-cnn3",
        "p02-cnn2",
    }
    assert "Unhandled error" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_slow_digest_holds_back_only_its_own_participant(ray_session):
    """After the consensus each participant digests, revisits and is evaluated on its own:
    on Ray the others' later steps run while one participant's digest is slow, and the
    numbers are the sequential loop's."""
    slow = {"train": {"rounds": 2}, "faults": ["0:digest:1:sleep3"]}
    events: list[dict] = []
    on_ray = run(
        tiny_config(resources={"backend": "ray", "torch_threads": 1}, **slow),
        progress=None,
        report=events.append,
    )
    local = run(tiny_config(**slow), progress=None)
    assert numbers(on_ray.metrics.to_pylist()) == numbers(local.metrics.to_pylist())
    together = [e for e in events if e["kind"] == "phase" and e.get("steps")]
    assert [e["round"] for e in together] == [1, 2]
    # Round 2's scores are computed at the end of round 1's steps; the last round has no next.
    assert together[0]["steps"] == ["digest", "revisit", "evaluate", "communicate"]
    assert together[1]["steps"] == ["digest", "revisit", "evaluate"]
    alone = [e["round"] for e in events if e["kind"] == "phase" and e["phase"] == "communicate"]
    assert alone == [1]
    done = [(e["participant"], e["phase"]) for e in events if e["kind"] == "done"]
    first_round = done[done.index(("p00-cnn2", "communicate")) :]
    slow_digest = first_round.index(("p00-cnn2", "digest"))
    assert ("p01-cnn3", "evaluate") in first_round[:slow_digest]
    walls = {
        r["phase"]: r["wall_seconds"]
        for r in on_ray.metrics.to_pylist()
        if r["round"] == 1 and r["phase"] in ("digest", "revisit", "evaluate")
    }
    assert walls["digest"] >= 3.0  # its slow digest is the step's last answer
