"""How the Ray backend shares the cores among participants' calls: the schedule's choice
from measured seconds, and real runs in which stacked calls use every core."""

from __future__ import annotations

import pytest
from conftest import numbers, tiny_config

from fedmd_ray import run
from fedmd_ray.backends.schedule import SPREAD, STACK, Schedule
from fedmd_ray.errors import ConfigError


def _round(schedule: Schedule, method: str, who: list[int], spread: float, stack: float, cost=None) -> list:
    """Plan one phase and record every call as if it took `spread` or `stack` seconds."""
    segments = schedule.plan(method, who, cost)
    for segment in segments:
        for i in segment.who:
            seconds = stack if segment.mode == STACK else spread
            schedule.record(method, segment.mode, i, seconds, seconds + 0.001)
    return segments


def test_warms_up_then_probes_both_ways_then_keeps_the_faster():
    schedule = Schedule("auto", cores=2)
    who = list(range(6))
    cost = {i: float(i) for i in who}
    # Round 1 warms every actor up, spread; its seconds would be unfair to either way.
    first = _round(schedule, "digest", who, spread=9.0, stack=9.0, cost=cost)
    assert [(s.mode, s.who, s.window, s.threads) for s in first] == [(SPREAD, who, 2, 1)]
    # Round 2: two probes at evenly spaced ranks of cost, stacked first, alone on both cores.
    second = _round(schedule, "digest", who, spread=1.0, stack=0.4, cost=cost)
    assert [(s.mode, s.who, s.window, s.threads) for s in second] == [
        (STACK, [1, 4], 1, 2),
        (SPREAD, [0, 2, 3, 5], 2, 1),
    ]
    # Round 3: everyone spread, which pairs the probes' seconds like with like.
    third = _round(schedule, "digest", who, spread=1.0, stack=0.4, cost=cost)
    assert [(s.mode, s.who) for s in third] == [(SPREAD, who)]
    fourth = schedule.plan("digest", who)
    assert [(s.mode, s.who, s.window, s.threads) for s in fourth] == [(STACK, who, 1, 2)]
    # 0.4 s + 1 ms a call stacked against 1.0 s / 2 cores spread, on the 2 probes.
    assert "one participant at a time on 2 threads" in schedule.news("digest")
    assert schedule.news("digest") is None  # said once

    # Small-batch calls that threads do not speed up stay spread.
    for _ in range(3):
        _round(schedule, "revisit", who, spread=0.3, stack=0.25)
    assert [s.mode for s in schedule.plan("revisit", who)] == [SPREAD]
    assert "2 participants at once" in schedule.news("revisit")


def test_a_probe_that_sits_out_is_replaced():
    """With sampled participation a probe measured stacked may not come back next round:
    another participant is probed instead, so the decision is not held up."""
    schedule = Schedule("auto", cores=2)
    _round(schedule, "revisit", [0, 1, 2, 3, 4], 1.0, 1.0)
    probed = {
        i for s in _round(schedule, "revisit", [0, 1, 2, 3, 4], 1.0, 1.0) if s.mode == STACK for i in s.who
    }
    assert len(probed) == 2
    present = [i for i in range(8) if i != max(probed)]
    segments = schedule.plan("revisit", present)
    stacked = [i for s in segments if s.mode == STACK for i in s.who]
    assert len(stacked) == 1 and stacked[0] not in probed


def test_round_trips_count_against_stacking():
    schedule = Schedule("auto", cores=2)
    for _ in range(3):
        for segment in schedule.plan("logits", [0, 1, 2, 3]):
            for i in segment.who:
                if segment.mode == STACK:  # 0.04 s of work, but 0.02 s more each round trip
                    schedule.record("logits", STACK, i, 0.04, 0.06)
                else:
                    schedule.record("logits", SPREAD, i, 0.1, 0.1)
    assert schedule.plan("logits", [0, 1, 2, 3])[0].mode == SPREAD  # 0.06 > 0.1 / 2


def test_fixed_policies_and_one_off_calls():
    assert [s.mode for s in Schedule("stack", 4).plan("digest", [0, 1])] == [STACK]
    assert [s.mode for s in Schedule("spread", 4).plan("digest", [0, 1, 2])] == [SPREAD]
    # Transfer learning runs once: nothing to learn from measuring it, it is spread.
    assert [s.mode for s in Schedule("auto", 2).plan("transfer", [0, 1, 2])] == [SPREAD]
    # Too few participants to probe beside: all spread, measured for next time.
    assert [s.mode for s in Schedule("auto", 2).plan("digest", [0, 1])] == [SPREAD]


def test_schedule_config_is_checked():
    with pytest.raises(ConfigError, match="resources.schedule"):
        tiny_config(resources={"schedule": "fast"})
    with pytest.raises(ConfigError, match="drop resources.torch_threads"):
        tiny_config(resources={"schedule": "stack", "torch_threads": 1})


def test_stacked_calls_run_on_every_core(ray_session, tmp_path):
    """schedule=stack runs each call alone on both cores: number for number what the local
    loop computes on two threads. One thread rounds gradients differently (checked first,
    so that the equality below could fail)."""
    two = run(tiny_config(resources={"torch_threads": 2}), tmp_path / "local2")
    one = run(tiny_config(), tmp_path / "local1")
    assert numbers(one.metrics.to_pylist()) != numbers(two.metrics.to_pylist())
    stacked = run(
        tiny_config(resources={"backend": "ray", "torch_threads": None, "schedule": "stack"}),
        tmp_path / "stack",
    )
    assert numbers(stacked.metrics.to_pylist()) == numbers(two.metrics.to_pylist())


def test_auto_schedule_decides_each_round_phase(ray_session, tmp_path):
    config = tiny_config(train={"rounds": 4}, resources={"backend": "ray", "torch_threads": None})
    result = run(config, tmp_path / "auto")
    notes = {
        r["phase"]: r["note"] for r in result.metrics.to_pylist() if (r["note"] or "").startswith("schedule:")
    }
    assert set(notes) == {"logits", "digest", "revisit", "evaluate"}
    for note in notes.values():
        assert "measured on 2 participants" in note
    assert result.summary and all(r["fedmd_final"] is not None for r in result.summary)
    assert "schedule:" in (tmp_path / "auto" / "summary.md").read_text()
