"""Progress a person sees: events from participants (through Ray on the ray backend), plain
lines when stdout is not a terminal, silence with --quiet."""

import io

import pytest

from fedmd_ray import run
from fedmd_ray.progress import Progress, duration
from tests.conftest import tiny_config


def _events(backend: str) -> list[dict]:
    events: list[dict] = []
    config = tiny_config(resources={"backend": backend}, train={"rounds": 1, "public_epochs": 3})
    run(config, progress=None, report=events.append)
    return events


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_participants_report_epochs_and_every_finish(ray_session, backend):
    events = _events(backend)
    names = ["p00-cnn2", "p01-cnn3", "p02-cnn2"]
    progress = [e for e in events if e["kind"] == "progress"]
    # Every participant said where its transfer learning was, from inside its actor.
    assert {e["participant"] for e in progress if e["phase"] == "transfer"} == set(names)
    assert any("public epoch 1/3" in e["text"] for e in progress)
    assert all(0 <= e["fraction"] <= 1 for e in progress)
    done = {(e["participant"], e["phase"]) for e in events if e["kind"] == "done"}
    for phase in ("transfer", "upper_bound", "communicate", "digest", "revisit", "evaluate"):
        assert {(n, phase) for n in names} <= done, phase
    phases = [e["phase"] for e in events if e["kind"] == "phase"]
    assert phases[:3] == ["setup", "transfer", "upper_bound"]
    assert [e for e in events if e["kind"] == "round"] == [{"kind": "round", "round": 1, "rounds": 1}]


def test_plain_lines_name_participants_phase_and_time_left():
    out = io.StringIO()
    display = Progress("plain", out)
    display.say("starting")
    display.event({"kind": "phase", "phase": "transfer", "round": 0, "rounds": 5, "participants": ["a", "b"]})
    display.event({"kind": "progress", "participant": "a", "phase": "transfer", "fraction": 0.5, "text": "x"})
    display.event({"kind": "done", "participant": "a", "phase": "transfer"})
    display.event(
        {"kind": "progress", "participant": "z", "phase": "digest", "fraction": 0.5}
    )  # not this phase
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "starting"
    assert lines[1].startswith("  a done (transfer: 1/2 participants done")
    assert "elapsed" in lines[1] and len(lines) == 2


def test_quiet_prints_nothing():
    out = io.StringIO()
    display = Progress("none", out)
    display.say("x")
    display.event({"kind": "phase", "phase": "transfer", "participants": ["a"]})
    assert out.getvalue() == ""


def test_live_display_renders_bars_for_running_participants():
    out = io.StringIO()
    display = Progress("live", out)
    display.event({"kind": "phase", "phase": "transfer", "round": 0, "rounds": 2, "participants": ["a", "b"]})
    display.event(
        {"kind": "progress", "participant": "b", "phase": "transfer", "fraction": 0.25, "text": "epoch 1/4"}
    )
    from rich.console import Console

    console = Console(file=io.StringIO(), width=100)
    console.print(display._render())
    screen = console.file.getvalue()
    display.close()
    assert "transfer: 0/2 participants done" in screen and "epoch 1/4" in screen and "b" in screen


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_steps_run_together_count_a_participant_done_after_its_last():
    display = Progress("plain", io.StringIO())
    steps = ["digest", "revisit", "evaluate"]
    display.event({"kind": "phase", "phase": " + ".join(steps), "steps": steps, "participants": ["a", "b"]})
    display.event({"kind": "done", "participant": "a", "phase": "digest"})
    display.event({"kind": "progress", "participant": "b", "phase": "revisit", "fraction": 0.5})
    assert display.done == set()
    assert display.fraction == {"a": 1 / 3, "b": 0.5}
    display.event({"kind": "done", "participant": "a", "phase": "evaluate"})
    assert display.done == {"a"} and display.fraction["a"] == 1.0
