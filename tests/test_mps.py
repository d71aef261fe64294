"""resources.mps="auto": NVIDIA MPS started where GPU actors share a device, and a clean
fallback where it cannot be (these machines have no GPU and no MPS tool, so the run goes on
without it and says why). The start-and-check logic runs against a stand-in for NVIDIA's
control tool that starts but serves no GPU: the daemon it started must be stopped again."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from fedmd_ray import run
from fedmd_ray.backends import mps
from fedmd_ray.backends.resources import Placement, shares_gpus
from fedmd_ray.errors import ConfigError
from tests.conftest import tiny_config


def test_mps_is_off_or_auto_and_needs_the_ray_backend():
    with pytest.raises(ConfigError, match="'resources.mps' is 'on'; it must be one of off, auto"):
        tiny_config(resources={"backend": "ray", "mps": "on"})
    with pytest.raises(ConfigError, match='write mps: "off"'):
        tiny_config(resources={"backend": "ray", "mps": False})  # YAML's reading of a bare off
    with pytest.raises(ConfigError, match="local backend"):
        tiny_config(resources={"backend": "local", "mps": "auto"})
    assert tiny_config(resources={"backend": "ray", "mps": "auto"}).resources.mps == "auto"


def test_only_actors_that_share_a_gpu_want_mps():
    assert shares_gpus(Placement(cpus=1, gpus=0.1, threads=1, slots=10))
    assert not shares_gpus(Placement(cpus=1, gpus=1, threads=1, slots=10))
    assert not shares_gpus(Placement(cpus=1, gpus=0, threads=1, slots=10))
    assert not shares_gpus(Placement(cpus=1, gpus=0.5, threads=1, slots=1))
    uneven = Placement(cpus=1, gpus=1, threads=1, slots=2, each=[(1, 1), (1, 0.5)])
    assert shares_gpus(uneven)


def test_a_run_on_a_node_without_mps_goes_on_without_it_and_says_why(ray_session, tmp_path):
    config = tiny_config(
        models=["cnn2:8,16,0.1", "cnn3:8,16,16,0.1"],
        participants=2,
        train={"rounds": 1},
        resources={"backend": "ray", "num_gpus": 0.5, "num_cpus": 1, "mps": "auto"},
    )
    result = run(config, tmp_path, progress=None)
    assert len(result.summary) == 2
    status = json.loads((tmp_path / "placement.json").read_text())["mps"]
    assert len(status) == 1  # the one (fake-GPU) node
    (node,) = status.values()
    if shutil.which(mps.CONTROL) is None:
        assert node == {
            "mps": "unavailable",
            "started": False,
            "why": f"no {mps.CONTROL} on this node's PATH",
        }
    summary = (tmp_path / "summary.md").read_text()
    assert "**NVIDIA MPS** (resources.mps=auto): on for 0 of 1 GPU nodes" in summary or node["mps"] == "on"


def stand_in(tmp_path, monkeypatch, on_start: str, answers: str) -> Path:
    """A stand-in for NVIDIA's control tool first on PATH; the log of its calls. `-d` runs
    `on_start`; other commands arrive on stdin, as the real tool takes them, are logged and
    run `answers` (which ends the script)."""
    log = tmp_path / "calls.log"
    tool = tmp_path / "bin" / mps.CONTROL
    tool.parent.mkdir()
    tool.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-d" ]; then echo "-d" >> {log}; {on_start}; fi\n'
        f'read command; echo "$command" >> {log}\n' + answers.replace("LOG", str(log))
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    return log


NO_DAEMON = 'echo "Cannot find MPS control daemon process" >&2; exit 1\n'


def test_a_daemon_that_serves_no_gpu_is_stopped_again(tmp_path, monkeypatch):
    # No daemon answers, before "-d" or after it; "quit" succeeds.
    log = stand_in(tmp_path, monkeypatch, "exit 0", '[ "$command" = "quit" ] && exit 0\n' + NO_DAEMON)
    if torch.cuda.is_available():
        pytest.skip("a real GPU would pass the check without any daemon")

    status = mps._here("start")

    assert status["mps"] == "unavailable" and not status["started"]
    assert "could not run through it" in status["why"]
    assert log.read_text().split() == ["get_server_list", "-d", "quit"]


def test_a_daemon_another_run_started_at_the_same_moment_is_used(tmp_path, monkeypatch):
    """Two runs on one node: both find no daemon, both start one; the second start fails
    because the first's is up, and that daemon serves both runs' actors."""
    # "-d" fails as NVIDIA's tool does when a daemon runs already; from then on one answers.
    already = 'echo "An instance of this daemon is already running" >&2; exit 1'
    log = stand_in(tmp_path, monkeypatch, already, 'grep -q -- "-d" LOG && exit 0\n' + NO_DAEMON)

    status = mps._here("start")

    assert status == {"mps": "on", "started": False, "why": "a daemon another run started at the same time"}
    assert log.read_text().split() == ["get_server_list", "-d", "get_server_list"]
