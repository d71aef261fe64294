"""A run's results and checkpoints on any storage pyarrow.fs reaches: here an S3-compatible
server on loopback (moto's server mode), reached the standard way (AWS_ENDPOINT_URL and the
AWS credential variables) by the driver and by every actor."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedmd_ray import run
from fedmd_ray.errors import ConfigError
from fedmd_ray.storage import Storage
from tests.conftest import LOCAL_RAY, numbers, tiny_config

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fedmd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, the variables that point pyarrow (and boto3) at it, and
    a Ray started with them, so that actors reach it too. Ends both."""
    import ray

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        if ray.is_initialized():
            ray.shutdown()  # actors inherit Ray's environment: start one that has the variables
        ray.init(**LOCAL_RAY)
        yield env
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_storage_reads_and_writes_a_folder_or_a_uri(tmp_path):
    local = Storage(tmp_path / "run")
    local.write_text("a/b.txt", "x")
    assert local.read_text("a", "b.txt") == "x" and local.names("a") == ["b.txt"]
    assert local.location("a", "b.txt") == str(tmp_path / "run" / "a" / "b.txt")
    assert Storage("file://" + str(tmp_path / "run")).read_text("a/b.txt") == "x"
    with pytest.raises(ConfigError, match="unknown storage scheme 'ftp://'"):
        Storage("ftp://host/run")


def test_a_run_on_s3_is_killed_and_resumes_there_with_the_same_numbers(s3, tmp_path):
    """Results and checkpoints in s3://: every participant's state written by its actor, a
    driver killed with SIGKILL after round 1's checkpoint, `fedmd-ray run --resume s3://...`:
    the numbers of an undisturbed run (the local loop's)."""
    out = f"s3://{BUCKET}/runs/killed"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(resources={"backend": "ray"}, train={"rounds": 3}).to_dict()))
    script = (
        "import sys, ray\n"
        "from tests.conftest import LOCAL_RAY\n"
        "from fedmd_ray.cli import main\n"
        "ray.init(**{**LOCAL_RAY, 'num_gpus': 0})\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-c", script, "run", "--config", str(config), "--out", out, "--quiet"]
    driver = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    storage = Storage(out)
    deadline = time.monotonic() + 240
    while not (
        storage.exists("checkpoint", "latest.json")
        and json.loads(storage.read_text("checkpoint", "latest.json"))["round"] >= 1
    ):
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    manifest = json.loads(storage.read_text("checkpoint", "latest.json"))
    assert {e["written_by"] for e in manifest["participants"].values()} == {"actor"}
    resumed = run(
        tiny_config(resources={"backend": "ray"}, train={"rounds": 3}), out, progress=None, resume=True
    )
    whole = run(tiny_config(train={"rounds": 3}), progress=None)
    assert numbers(resumed.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())
    on_s3 = pq.read_table(storage.path("metrics.parquet"), filesystem=storage.fs).to_pylist()
    assert numbers(on_s3) == numbers(whole.metrics.to_pylist())
    assert {"summary.md", "summary.json", "accuracy.png", "config.json"} <= set(storage.names())
    assert storage.names("checkpoint") == ["latest.json", "round-0003"]


def test_a_place_that_cannot_hold_results_is_refused_before_any_work(tmp_path):
    existing = tmp_path / "a-file"
    existing.write_text("x")
    for out, message in (
        (existing, "is a file; name a folder"),
        (Path("/proc/fedmd/run"), "cannot be written to"),
        (existing / "below", "is a file, so no folder can be made there"),
    ):
        with pytest.raises(ConfigError, match=message):
            run(tiny_config(), out, progress=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
