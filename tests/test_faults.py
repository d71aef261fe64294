"""Failures a long run must survive, on the default settings: a participant's actor dying
mid-round (restarted from its last round's state), killed from outside, a driver killed
with SIGKILL and resumed from the run directory — each ending with exactly the numbers of
an undisturbed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedmd_ray import run
from fedmd_ray.errors import CheckpointError, ConfigError, ParticipantError
from fedmd_ray.results import Recorder
from fedmd_ray.storage import Storage
from fedmd_ray.tasks import build_task
from tests.conftest import LOCAL_RAY, numbers, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Ray with the default resources, as a user runs it: threads from the cores, fresh actors.
DEFAULTS = {"backend": "ray", "torch_threads": None, "reuse_actors": False}


@pytest.fixture(scope="module")
def undisturbed():
    """The run every disturbed one must match: Ray, default resources, 3 rounds."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    return run(tiny_config(resources=DEFAULTS, train={"rounds": 3}), progress=None)


@pytest.mark.slow
def test_an_actor_killed_mid_round_is_restarted_and_the_run_ends_the_same(ray_session, undisturbed):
    crashed = run(
        tiny_config(resources=DEFAULTS, train={"rounds": 3}, faults=["1:digest:2:exit"]),
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
def test_ray_kill_from_outside_during_a_round(ray_session, undisturbed):
    """The driver's view of an actor killed by someone else (an OOM killer, an operator):
    p01's actor is killed as round 2's steps go out."""
    killed_once = []

    def kill_when_round_2_starts(event):
        if event["kind"] == "phase" and event["round"] == 2 and "digest" in event.get("steps", []):
            if not killed_once:
                killed_once.append(True)
                name = next(n for n in ray_session.util.list_named_actors() if n.endswith("/p01-cnn3"))
                ray_session.kill(ray_session.get_actor(name), no_restart=True)

    config = tiny_config(resources=DEFAULTS, train={"rounds": 3})
    killed = run(config, progress=None, report=kill_when_round_2_starts)
    assert killed_once
    assert numbers(killed.metrics.to_pylist()) == numbers(undisturbed.metrics.to_pylist())
    restarted = [r for r in killed.metrics.to_pylist() if r["note"] and r["note"].startswith("restarted")]
    assert [(r["round"], r["participant"]) for r in restarted] == [(2, "p01-cnn3")]


@pytest.mark.slow
def test_an_actor_ended_by_rays_memory_monitor_is_restarted_and_the_run_ends_the_same(undisturbed):
    """Ray's memory monitor ends a worker when its node runs low on RAM: here a Ray whose
    threshold sits 2.5 GiB above what the machine uses now, and p01 taking 3 GiB more in
    round 2's digest (faults: ':memory3'). The run used to stop there."""
    import ray

    meminfo = dict((line.split(":")[0], int(line.split()[1]) * 1024) for line in open("/proc/meminfo"))
    threshold = (meminfo["MemTotal"] - meminfo["MemAvailable"] + 2.5 * 2**30) / meminfo["MemTotal"]
    ray.shutdown()
    ray.init(
        **LOCAL_RAY, _system_config={"memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 100}
    )
    try:
        ended = run(
            tiny_config(resources=DEFAULTS, train={"rounds": 3}, faults=["1:digest:2:memory3"]),
            progress=None,
        )
    finally:
        ray.shutdown()  # the next test's Ray has the default threshold
    notes = [(r["round"], r["participant"], r["note"]) for r in ended.metrics.to_pylist() if r["note"]]
    assert (
        2,
        "p01-cnn3",
        "restarted (actor ended by Ray's memory monitor: the node ran low on RAM)",
    ) in notes
    assert numbers(ended.metrics.to_pylist()) == numbers(undisturbed.metrics.to_pylist())


def _kill(ray, suffix: str) -> None:
    """Kill the participant actor whose name ends in `suffix`, and wait until it is dead."""
    name = next(n for n in ray.util.list_named_actors() if n.endswith(suffix))
    actor = ray.get_actor(name)
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} did not die")


@pytest.mark.slow
def test_restarts_are_bounded(ray_session):
    """p01's actor is killed after round 1 and restarted; its replacement is killed after
    round 2, one death more than resources.max_restarts=1 allows."""
    config = tiny_config(resources={**DEFAULTS, "max_restarts": 1}, train={"rounds": 3})
    suffixes = {1: "/p01-cnn3", 2: "/p01-cnn3-r1"}
    with pytest.raises(
        ParticipantError,
        match=r"'p01-cnn3' failed during .*restarted 1 times already; resources.max_restarts=1",
    ):
        run(config, progress=None, on_round=lambda round_, _summary: _kill(ray_session, suffixes[round_]))


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_the_same(tmp_path):
    settings = {"resources": {"backend": "local"}, "train": {"rounds": 3}}
    whole = run(tiny_config(**settings), tmp_path / "whole", progress=None)
    out = tmp_path / "stopped"
    with pytest.raises(ParticipantError):  # the driver stops in round 3
        run(tiny_config(**settings, faults=["2:revisit:3"]), out, progress=None)
    assert (out / "checkpoint" / "latest.json").exists()
    resumed = run(tiny_config(**settings), out, progress=None, resume=True)
    assert numbers(resumed.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())
    assert numbers(pq.read_table(out / "metrics.parquet").to_pylist()) == numbers(whole.metrics.to_pylist())
    assert [r.fedmd_final for r in resumed.summary] == [r.fedmd_final for r in whole.summary]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest.json", "round-0003"]


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_its_start(tmp_path):
    """Nothing to continue from: a resume says so and runs the run again from its start, to
    the same numbers, rather than telling the user to start afresh by hand."""
    settings = {"resources": {"backend": "local"}, "train": {"rounds": 2}}
    whole = run(tiny_config(**settings), tmp_path / "whole", progress=None)
    out = tmp_path / "stopped"
    with pytest.raises(ParticipantError):  # in transfer learning, before any checkpoint
        run(tiny_config(**settings, faults=["1:transfer:0"]), out, progress=None)
    assert (out / "config.json").exists() and not (out / "checkpoint" / "latest.json").exists()
    said = []
    resumed = run(tiny_config(**settings), out, progress=said.append, resume=True)
    assert said[0] == f"no checkpoint in {out} to continue from: the run runs again from its start"
    assert numbers(pq.read_table(out / "metrics.parquet").to_pylist()) == numbers(whole.metrics.to_pylist())
    assert [r.fedmd_final for r in resumed.summary] == [r.fedmd_final for r in whole.summary]


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_resumes_with_the_same_numbers(ray_session, undisturbed, tmp_path):
    """`fedmd-ray run` on Ray, killed with SIGKILL once round 1's checkpoint is written (no
    handler runs, nothing is flushed), then `fedmd-ray run --resume`: the numbers of the
    undisturbed run. Each driver is a fresh interpreter, which also shows that a driver of
    Ray actors (run, checkpoints, resume) never imports torch: ~0.5 GiB of a driver's memory,
    at 10 000 participants the difference between fitting in 2 GiB and not."""
    out = tmp_path / "killed"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(resources=DEFAULTS, train={"rounds": 3}).to_dict()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # The driver starts a Ray of its own (2 CPUs, loopback), as a user's `fedmd-ray run` does.
    script = (
        "import sys, ray\n"
        "from tests.conftest import LOCAL_RAY\n"
        "from fedmd_ray.cli import main\n"
        "ray.init(**{**LOCAL_RAY, 'num_gpus': 0})\n"
        "code = main(sys.argv[1:])\n"
        "print('torch modules:', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
        "sys.exit(code)\n"
    )
    argv = [sys.executable, "-c", script, "run", "--config", str(config), "--out", str(out), "--quiet"]
    driver = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    manifest = out / "checkpoint" / "latest.json"
    deadline = time.monotonic() + 240
    while not (manifest.exists() and json.loads(manifest.read_text())["round"] >= 1):
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait()
    argv = [sys.executable, "-c", script, "run", "--resume", str(out), "--quiet"]
    resumed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "torch modules: []" in resumed.stdout
    assert numbers(pq.read_table(out / "metrics.parquet").to_pylist()) == numbers(
        undisturbed.metrics.to_pylist()
    )


def test_a_resume_can_add_rounds(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 1}), out, progress=None)
    longer = run(tiny_config(train={"rounds": 3}), out, progress=None, resume=True)
    whole = run(tiny_config(train={"rounds": 3}), progress=None)
    assert numbers(longer.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())


def test_resuming_a_finished_run_starts_nothing_and_a_shorter_one_is_refused(tmp_path, monkeypatch):
    """A finished run resumed (a scheduler's retry of a job killed as it exited) computes
    nothing and starts no participant: its results are written again from its metrics,
    per-participant privacy spent included. One resumed with fewer rounds than it ran is
    refused before any work: it cannot be taken back."""
    from fedmd_ray import fedmd

    dp = {"clip": 1.0, "noise_multiplier": 1.0}
    out = tmp_path / "run"
    whole = run(tiny_config(sharing=dp), out, progress=None)
    written = (out / "summary.md").read_text()
    (out / "summary.md").unlink()  # as if stopped while writing its results
    monkeypatch.setattr(fedmd, "make_backend", lambda *a, **k: pytest.fail("a participant was started"))
    said = []
    again = run(tiny_config(sharing=dp), out, progress=said.append, resume=True)
    assert any("had already finished its 2 rounds; nothing to run" in line for line in said)
    assert (out / "summary.md").read_text() == written
    assert [r.to_dict() for r in again.summary] == [r.to_dict() for r in whole.summary]
    assert all(r.epsilon is not None and r.parameters for r in again.summary)
    assert numbers(again.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())
    with pytest.raises(ConfigError, match=r"has already run 2 rounds; train.rounds=1 would end it"):
        run(tiny_config(sharing=dp, train={"rounds": 1}), out, progress=None, resume=True)
    with pytest.raises(CheckpointError, match=r"train.lr \(0.001 -> 0.01\)"):
        run(tiny_config(sharing=dp, train={"lr": 0.01}), out, progress=None, resume=True)
    assert numbers(pq.read_table(out / "metrics.parquet").to_pylist()) == numbers(whole.metrics.to_pylist())


def test_mismatched_damaged_missing_or_old_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 1}), out, progress=None)
    said: list[str] = []
    with pytest.raises(
        CheckpointError, match=r"settings that change the numbers: train.lr \(0.001 -> 0.01\)"
    ):
        run(tiny_config(train={"rounds": 2, "lr": 0.01}), out, progress=said.append, resume=True)
    assert not any("starting" in line for line in said), said  # refused before any participant starts
    state = out / "checkpoint" / "round-0001" / "p01-cnn3.pt"
    good = state.read_bytes()
    state.write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"p01-cnn3: checkpoint .*p01-cnn3.pt is damaged"):
        run(tiny_config(train={"rounds": 2}), out, progress=None, resume=True)
    state.write_bytes(good)
    manifest = out / "checkpoint" / "latest.json"
    old = json.loads(manifest.read_text())
    del old["format"]  # as the previous version wrote it
    manifest.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"another version of fedmd_ray \(format 1; .* format 2\)"):
        run(tiny_config(train={"rounds": 2}), out, progress=None, resume=True)
    # A manifest is data, not a pointer: it may name only files of the run's checkpoint folder.
    for field, value in (("directory", "../../elsewhere"), ("file", "/etc/passwd")):
        bad = {**old, "format": 2}
        if field == "directory":
            bad["directory"] = value
        else:
            bad["participants"] = {
                **old["participants"],
                "p01-cnn3": {**old["participants"]["p01-cnn3"], "file": value},
            }
        manifest.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="which is not a file of this run's checkpoint folder"):
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


class _CrashesAfterOneChange(Storage):
    """A results folder whose first change to the metrics goes through and then the
    process "dies": what a resume leaves on disk at its worst moment."""

    armed = False

    def _crash_after(self, change, *args):
        change(*args)
        if self.armed:
            raise SystemExit("killed")

    def delete(self, *parts):
        self._crash_after(super().delete, *parts)

    def write_bytes(self, name, data):
        self._crash_after(super().write_bytes, name, data)


def test_a_resume_interrupted_while_it_trims_the_metrics_keeps_every_earlier_round(tmp_path):
    """Recorder.resume takes back rounds up to the checkpoint: killed after any one change,
    every row of those rounds is still on disk (it never deletes them to write them again)."""
    out = tmp_path / "run"
    run(tiny_config(train={"rounds": 3}), out, progress=None)
    whole = pq.read_table(out / "metrics.parquet").to_pylist()
    storage = _CrashesAfterOneChange(out)
    config = tiny_config(train={"rounds": 3})
    recorder = Recorder(storage, config, build_task(config), say=lambda _m: None)
    storage.armed = True
    with pytest.raises(SystemExit):
        recorder.resume(1)
    left = pq.read_table(out / "metrics.parquet").to_pylist()
    assert numbers([r for r in left if r["round"] <= 1]) == numbers([r for r in whole if r["round"] <= 1])
    assert any(r["round"] > 1 for r in whole)


def test_a_folder_another_live_run_writes_to_is_refused_and_left_alone(tmp_path):
    """Two runs given the same --out at once: the second is refused before any participant
    starts, and touches nothing of the first's; once the first's process is gone its mark is
    stale, and a run goes ahead. A finished run leaves no mark."""
    import json as json_
    import socket
    import subprocess
    import sys

    from fedmd_ray import running
    from fedmd_ray.errors import ConfigError

    out = tmp_path / "shared"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the first run's, as it starts
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mark = {"pid": other.pid, "host": socket.gethostname(), "since": "2026-12-03 12:00:00"}
        (out / running.MARK).write_text(json_.dumps(mark))
        with pytest.raises(
            ConfigError,
            match=rf"Another run \(process {other.pid}, since 2026-12-03 12:00:00\) is writing to {out} now",
        ):
            run(tiny_config(train={"rounds": 1}), out, progress=None)
        assert (out / "config.json").read_text() == "{}" and not (out / "metrics.parquet").exists()
    finally:
        other.kill()
        other.wait()
    result = run(tiny_config(train={"rounds": 1}), out, progress=None)  # the mark is stale now
    assert result.summary and not (out / running.MARK).exists()
