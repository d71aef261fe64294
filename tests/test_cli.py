"""The `fedmd-ray` command as a user meets it: in-process, and once as a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedmd_ray.cli import main
from tests.conftest import QUICK


def test_run_smoke_preset_writes_results(ray_session, tmp_path, capsys):
    out = tmp_path / "smoke"
    code = main(
        [
            "run",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--set",
            "train.rounds=1",
            "--set",
            "train.public_epochs=1",
            "--set",
            "resources.reuse_actors=true",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "round   1/1" in printed and "lower bound (transfer learning)" in printed
    assert "| **mean** |" in printed
    assert json.loads((out / "config.json").read_text())["train"]["rounds"] == 1
    assert (out / "metrics.parquet").exists() and (out / "accuracy.png").exists()


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path, capsys):
    assert main(["run", "--preset", "smoke", "--set", 'models=["resnet19"]']) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Unknown model 'resnet19'. Did you mean 'resnet18'") and "Traceback" not in err
    )
    assert main(["run", "--preset", "smoke", "--set", "train.rouns=3"]) == 1
    assert "Did you mean 'rounds'" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "--preset",
                "mnist-femnist",
                "--data-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--backend",
                "local",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "Dataset 'mnist' (train split) not found" in err and "--download" in err


def test_listing_commands(capsys, tmp_path, monkeypatch):
    assert main(["presets"]) == 0 and "mnist-femnist" in capsys.readouterr().out
    assert main(["models"]) == 0 and "cnn3  (default 128,192,256,0.2)" in capsys.readouterr().out
    # Each built-in dataset says where it would be read from, or where it was looked for.
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"")
    monkeypatch.setenv("FEDMD_DATA_DIR", str(tmp_path))
    assert main(["datasets"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if " " in line)
    assert listed["emnist_letters"] == f"not found under {tmp_path.resolve()}"
    assert listed["cifar10"] == str(tmp_path / "cifar-10-batches-py")
    assert listed["cifar100"].startswith("not found") and listed["synthetic"] == "made in memory"
    assert main(["datasets", "--data-dir", str(tmp_path / "elsewhere")]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if " " in line)
    assert listed["cifar10"] == f"not found under {(tmp_path / 'elsewhere').resolve()}"
    assert main(["config", "--preset", "smoke", "--set", "seed=3"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3


@pytest.mark.slow
def test_console_script_runs_as_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmd_ray.cli",
            "run",
            "--set",
            "train.rounds=1",
            *QUICK,
            "--backend",
            "local",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "results in" in proc.stdout and (tmp_path / "r" / "summary.md").exists()


@pytest.mark.slow
def test_a_crash_fault_on_the_local_backend_says_so_and_leaves_a_checkpoint(tmp_path):
    """On the local backend a participant's process is the run's own: an 'exit' fault ends
    the command, which says why rather than stopping without a word; --resume continues."""
    out = tmp_path / "r"
    argv = [sys.executable, "-m", "fedmd_ray.cli", "run", "--backend", "local", "--quiet", "--out", str(out)]
    argv += ["--set", "train.rounds=2", *QUICK, "--set", 'faults=["1:digest:2:exit"]']
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "simulated fault: the process of participant 1 dies in digest of round 2 (faults: '1:digest:2:exit')"
    )
    assert (out / "checkpoint" / "latest.json").exists()
    assert main(["run", "--quiet", "--resume", str(out), "--set", "faults=[]"]) == 0
    assert (out / "summary.md").exists()


def test_a_place_that_can_hold_no_more_is_one_line_and_loses_nothing(tmp_path):
    """A full disk (here: the process may write no file over 100 KiB, RLIMIT_FSIZE, so the
    first participant state of the checkpoint fails as a full disk would) stops the run with
    what could not be written, not a traceback; the files written before stay whole, no
    part-file is left, and once there is room --resume continues."""
    import resource

    out = tmp_path / "r"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, 100 * 1024))

    argv = [sys.executable, "-m", "fedmd_ray.cli", "run", "--backend", "local", "--quiet", "--out", str(out)]
    argv += ["--set", "train.rounds=1", *QUICK]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error, kept = proc.stderr.strip().splitlines()[-2:]
    assert (
        error.startswith(f"error: Could not write {out}/checkpoint/round-0000/p0")
        and "File too large" in error
    )
    assert (
        kept
        == f"results written so far are in {out}/; run it again with: fedmd-ray run --resume {out} "
        + ("(with no checkpoint, from its start)")
    )
    assert not [p for p in out.rglob(".*.tmp")]  # no half-written file left behind
    assert json.loads((out / "config.json").read_text())["train"]["rounds"] == 1
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_resume_continues_a_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "r"
    quick = [*QUICK, "--backend", "local", "--quiet"]
    assert main(["run", "--out", str(out), "--set", "train.rounds=1", *quick]) == 0
    assert main(["run", "--resume", str(out), "--set", "train.rounds=2", "--backend", "local"]) == 0
    printed = capsys.readouterr().out
    assert "resumed after round 1" in printed and "round   2/2" in printed and "round   1/2" not in printed
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert main(["run", "--resume", str(out), "--preset", "smoke"]) == 1
    assert "drop --preset" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 1
    assert "not a fedmd-ray run directory" in capsys.readouterr().err


def test_a_new_run_does_not_replace_an_earlier_ones_results_unless_told(tmp_path, capsys):
    """`--out` that holds an earlier run's rounds is refused, and the earlier results stay;
    with --overwrite the folder holds the new run only (no earlier round mixed into its
    metrics, no earlier checkpoint to resume)."""
    import pyarrow.parquet as pq

    out = tmp_path / "r"
    quick = [*QUICK, "--backend", "local", "--quiet"]
    assert main(["run", "--out", str(out), "--set", "train.rounds=3", *quick]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["run", "--out", str(out), "--set", "train.rounds=1", *quick]) == 1
    err = capsys.readouterr().err
    assert "holds the results of an earlier run ('smoke', finished)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["run", "--out", str(out), "--set", "train.rounds=1", "--overwrite", *quick]) == 0
    assert sorted(set(pq.read_table(out / "metrics.parquet").column("round").to_pylist())) == [0, 1]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest.json", "round-0001"]
    assert (out / "notes.txt").read_text() == "mine"


def test_tune_refuses_a_bad_search_file_clearly(tmp_path, capsys):
    spec = tmp_path / "search.json"
    spec.write_text(json.dumps({"preset": "smoke", "search": {"train.round": {"choice": [1, 2]}}}))
    assert main(["tune", "--config", str(spec), "--out", str(tmp_path / "t")]) == 1
    assert "Did you mean 'rounds'" in capsys.readouterr().err
    spec.write_text(json.dumps({"preset": "smoke", "search": {"train.rounds": {"choice": [1, 2]}}}))
    assert main(["tune", "--config", str(spec), "--samples", "0", "--out", str(tmp_path / "t")]) == 1
    assert (
        "'num_samples' (--samples) is 0; it must be a whole number of at least 1" in capsys.readouterr().err
    )
    assert main(["tune", "--config", str(spec), "--out", str(spec)]) == 1
    assert "is a file; name a folder" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'["train", 3]', "holds a list; its top level must be an object"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not UTF-8 text"),
        (b"{not json", "could not be parsed"),
    ],
)
def test_bad_config_files_get_one_line_for_run_and_tune(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    for argv in (["run", "--config", str(bad), "--out", str(tmp_path / "o")], ["tune", "--config", str(bad)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_run_refused_before_any_work_leaves_no_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "refused"
    argv = ["run", "--backend", "local", "--out", str(out), "--set", "sharing.topk=99"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'sharing.topk' is 99; this task has 16 classes" in err
    assert "results written so far" not in err and not out.exists()
    # Nor with the default --out, which the command makes as it starts.
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--backend", "local", "--set", "sharing.topk=99"]) == 1
    assert not (tmp_path / "runs").exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """`for s in 1 2 3; do fedmd-ray run --set seed=$s & done`: one folder each, not one
    folder mixing three runs' rounds."""
    from fedmd_ray import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda _fmt: "20261203-120000")
    folders = [cli._claim_default_out("smoke") for _ in range(3)]
    assert folders == [
        "runs/smoke-20261203-120000",
        "runs/smoke-20261203-120000-2",
        "runs/smoke-20261203-120000-3",
    ]
    assert all((tmp_path / f).is_dir() for f in folders)


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["data.input_shape=[1,0,28]"],
            "'data.input_shape' is [1, 0, 28]; it must be three positive whole numbers",
        ),
        (
            ['models=["cnn2","cnn3","cnn2:8,8,0.1"]', "participants=2"],
            "'participants' is 2 but 'models' names 3",
        ),
        (["train.consensus=agg.py:wrong_shape"], "returned shape (16,); it must return (samples, classes)"),
        (["train.consensus=agg.py:not_finite"], "returned NaN or infinite values"),
        (["train.consensus=agg.py:not_an_array"], "it must return (samples, classes)"),
        (
            ["train.digest_loss=losses.py:per_sample"],
            "losses.py:per_sample' of participant p00-cnn2",  # named by its absolute path
        ),
        (
            ["train.digest_loss=losses.py:constant"],
            "it returned a loss that does not depend on the outputs (no gradient reaches them)",
        ),
        (["train.digest_loss=losses.py:not_finite"], "of shape (2, 16) it returned nan; it must be finite"),
    ],
)
def test_bad_input_is_refused_before_any_work_in_one_line(tmp_path, monkeypatch, capsys, sets, message):
    """Each: one line, exit 1, no results folder left behind; a user's consensus and digest
    loss are tried on made-up scores before transfer learning, as models are."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "agg.py").write_text(
        "import numpy as np\n\n"
        "def wrong_shape(scores, weights=None):\n    return scores.mean(axis=(0, 1))\n\n"
        "def not_finite(scores, weights=None):\n    return scores.mean(axis=0) * np.nan\n\n"
        "def not_an_array(scores, weights=None):\n    return 'mean'\n"
    )
    (tmp_path / "losses.py").write_text(
        "import torch\n\n"
        "def per_sample(outputs, target):\n    return (outputs - target).abs().mean(dim=1)\n\n"
        "def constant(outputs, target):\n    return torch.tensor(1.0)\n\n"
        "def not_finite(outputs, target):\n    return (outputs - target).abs().mean() * float('nan')\n"
    )
    argv = ["run", "--backend", "local", "--out", str(tmp_path / "out"), "--set", "train.public_epochs=1"]
    for pair in sets:
        argv += ["--set", pair]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_or_an_unwritable_place_is_one_line(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("x")
    for out, message in ((existing, "is a file; name a folder"), ("/proc/fedmd/run", "cannot be written to")):
        assert main(["run", "--backend", "local", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during Ray's start", "mid-run"])
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, when):
    """A scheduler's SIGTERM (Slurm, Kubernetes): one line saying the run was stopped and
    how to resume, the results so far kept, no C++ stack dump from Ray, a prompt exit."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "fedmd_ray.cli", "run", "--out", str(out), "--progress", "plain"]
    argv += ["--set", "train.rounds=50", "--set", "resources.num_cpus=0.5"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    if when == "mid-run":
        while not (out / "checkpoint" / "latest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    else:
        # Ray starts as the run says so (a fixed sleep, on a loaded machine, fired before the
        # interpreter was up, and SIGTERM's default action killed it).
        for line in proc.stdout:
            assert time.monotonic() < deadline
            if line.startswith("starting ") and "on the 'ray' backend" in line:
                break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30, "the run took too long to stop"
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM received" not in stderr and "PC: @" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped (SIGTERM);"), stderr[-2000:]
    if when == "mid-run":
        assert f"continue with: fedmd-ray run --resume {out}" in last
        assert "Incomplete run" in (out / "summary.md").read_text()
