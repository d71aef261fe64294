"""The scripts a researcher runs (benchmark, comparison, reproduction) work end to end at a
tiny size and write what they promise. No timing is asserted: these machines are noisy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedmd_ray.backends.resources import concurrency_window, even_share, participant_threads
from fedmd_ray.errors import ResourceError
from tests.conftest import QUICK, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_bench_prints_the_side_by_side_table(tmp_path):
    proc = _script(
        "bench.py",
        "--participants",
        "3",
        "--rounds",
        "1",
        "--public-subset",
        "200",
        "--public-train",
        "300",
        "--image-size",
        "16",
        "--out",
        str(tmp_path),
    )
    assert "ray/local" in proc.stdout and "ray overhead" in proc.stdout
    phases = pq.read_table(tmp_path / "bench.parquet").to_pylist()
    assert {(r["backend"], r["phase"]) for r in phases} >= {("local", "digest"), ("ray", "digest")}
    meta = json.loads((tmp_path / "bench.json").read_text())
    assert meta["results"]["ray"]["seconds_per_round"] > 0


@pytest.mark.slow
def test_bench_participants_measures_a_pool_ungrouped_and_grouped(tmp_path):
    proc = _script(
        "bench_participants.py",
        *("--participants", "4", "--actors", "2", "--dedicated-up-to", "0", "--rounds", "1"),
        *("--out", str(tmp_path)),
    )
    assert "ms/participant-round" in proc.stdout
    rows = pq.read_table(tmp_path / "participants.parquet").to_pylist()
    assert [(r["participants"], r["actors"], r["grouped"]) for r in rows] == [(4, 2, False), (4, 2, True)]
    for r in rows:
        assert r["ms_per_participant_round"] > 0 and r["states_mib"] > 0
        # the driver's resident set holds its own heap and the store's pages it mapped in
        assert 0 < r["driver_heap_peak_mib"] <= r["driver_peak_mib"]
        assert 0 <= r["driver_shared_peak_mib"] <= r["driver_peak_mib"]


@pytest.mark.slow
def test_compare_consensus_writes_table_and_plot(tmp_path):
    agg = tmp_path / "agg.py"
    agg.write_text("def half(scores, weights=None):\n    return scores.mean(axis=0) / 2\n")
    proc = _script(
        "compare_consensus.py",
        "--only",
        "no-consensus,median",
        "--consensus",
        f"{agg}:half",
        "--rounds",
        "1",
        "--participants",
        "3",
        "--set",
        "train.public_epochs=1",
        "--set",
        "train.private_epochs=5",
        "--set",
        "train.public_subset_size=200",
        "--backend",
        "local",
        "--out",
        str(tmp_path),
    )
    rows = pq.read_table(tmp_path / "comparison.parquet").to_pylist()
    assert [r["variant"] for r in rows] == ["no-consensus", "median", f"{agg}:half"]
    assert (tmp_path / "comparison.png").stat().st_size > 0 and "| median |" in proc.stdout


@pytest.mark.slow
def test_reproduce_writes_report_and_figure(tmp_path):
    _script(
        "reproduce.py",
        "smoke",
        "--backend",
        "local",
        "--set",
        "train.rounds=1",
        *QUICK,
        "--out",
        str(tmp_path),
    )
    report = (tmp_path / "reproduction.md").read_text()
    assert "mean gain" in report and "wall time" in report and "Paper:" in report
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_concurrency_window():
    many = tiny_config(models=["cnn2:8,16,0.1"] * 10)
    assert concurrency_window(many, {"CPU": 2}, threads=1) == 2
    assert concurrency_window(tiny_config(), {"CPU": 4}, threads=1) is None  # fewer participants than cores
    assert (
        concurrency_window(
            tiny_config(models=["cnn2:8,16,0.1"] * 10, resources={"num_gpus": 0.1}),
            {"CPU": 2, "GPU": 1},
            threads=1,
        )
        is None
    )
    assert concurrency_window(tiny_config(resources={"max_concurrent": 1}), {"CPU": 8}, threads=1) == 1


def test_threads_follow_the_config_and_the_cluster_not_the_backend():
    ten = tiny_config(models=["cnn2:8,16,0.1"] * 10, resources={"torch_threads": None})
    assert participant_threads(ten, 2) == 1  # 0.2 of a core each
    assert participant_threads(ten, 40) == 4
    two = tiny_config(models=["cnn2:8,16,0.1"] * 2, resources={"torch_threads": None})
    assert participant_threads(two, 5) == 2  # 2.5 cores each, rounded down
    assert participant_threads(tiny_config(resources={"torch_threads": 3}), 2) == 3
    assert participant_threads(tiny_config(resources={"torch_threads": None, "num_cpus": 2.0}), 64) == 2
    # a pool's participants get what they would get with actors of their own
    pooled = tiny_config(models=["cnn2:8,16,0.1"] * 10, resources={"torch_threads": None, "actors": 2})
    assert participant_threads(pooled, 40) == participant_threads(ten, 40)


def test_even_cpu_share_fits_node_by_node():
    assert even_share([2.0], 10) == 0.2
    assert even_share([1.0] * 4, 10) == 0.33  # 0.4 each would leave two actors without a node
    assert even_share([1.0, 1.0], 3) == 0.5
    assert even_share([0.5], 100) == 0.01


def test_the_local_backend_says_when_a_share_asks_for_more_threads_than_cores():
    from fedmd_ray.backends.resources import local_cpus
    from fedmd_ray.fedmd import _warn_oversubscribed

    said: list[str] = []
    cores = local_cpus()
    _warn_oversubscribed(tiny_config(resources={"torch_threads": cores + 1}), said.append)
    assert said == [
        f"warning: each participant computes on {cores + 1} torch threads (resources.torch_threads) and this "
        f"machine has {cores} cores: the local backend runs them as asked, slowly. A smaller "
        "resources.torch_threads runs faster, with other numbers."
    ]
    said.clear()
    _warn_oversubscribed(tiny_config(resources={"torch_threads": cores}), said.append)
    _warn_oversubscribed(tiny_config(resources={"backend": "ray", "torch_threads": cores + 1}), said.append)
    assert said == []  # said by the local backend only, which has no cluster to place shares against


def test_a_strict_spread_wider_than_a_fixed_ray_is_refused_at_once():
    """A Ray the run started itself gains no nodes: STRICT_SPREAD over more actors than it
    has nodes is refused before Ray is asked (which waited 60 s to say the same)."""
    from fedmd_ray.backends.resources import _check_strict

    with pytest.raises(
        ResourceError, match="STRICT_SPREAD puts each of 4 actors on a node of its own; this Ray has 1 node"
    ):
        _check_strict("STRICT_SPREAD", 4, 1)
    _check_strict("STRICT_SPREAD", 2, 2)
    _check_strict("SPREAD", 4, 1)


def test_reproduce_stopped_before_any_work_says_only_what_is_wrong(tmp_path, capsys):
    """A dataset that is not there: the error and its fix, no 'results written so far' for a
    folder that was never made."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    out = tmp_path / "r"
    assert reproduce.main(["mnist-femnist", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Dataset 'mnist' (train split) not found") and "written so far" not in err, (
        err
    )
    assert err.endswith("or pass --download to fetch it.") and not out.exists()


@pytest.mark.parametrize(
    "script, args, says",
    [
        (
            "bench.py",
            ["--participants", "0"],
            "argument --participants: '0' is not a whole number of at least 1",
        ),
        ("bench.py", ["--backends", "local,rya"], "unknown backend(s) rya (choose from ray, local)"),
        (
            "bench_participants.py",
            ["--participation", "1.5"],
            "'1.5' is not a fraction above 0 and at most 1",
        ),
        ("gpu_placement.py", ["--actors", "0"], "argument --actors: '0' is not a whole number of at least 1"),
        ("compare_consensus.py", ["--rounds", "0"], "argument --rounds: '0' is not a whole number"),
        ("compare_consensus.py", ["--consensus", "nope"], "'train.consensus' is 'nope'; it must be one of"),
        (
            "compare_consensus.py",
            ["--participants", "5"],
            "give --participants 8 or more, or choose variants",
        ),
        (
            "reproduce.py",
            ["smoke", "--seeds", "0"],
            "argument --seeds: '0' is not a whole number of at least 1",
        ),
    ],
)
def test_scripts_refuse_bad_arguments_before_any_work(tmp_path, script, args, says):
    """A value no run could use is refused by the command line, before a variant trains or Ray
    starts: `compare_consensus.py --consensus nope` used to train every variant before it
    (a minute and more) and then stop with a traceback."""
    out = tmp_path / "out"
    writes = script != "gpu_placement.py"  # the one that writes no files
    proc = _script(script, *args, *(["--out", str(out)] if writes else []), returncode=2)
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_an_address_where_nothing_answers_is_said_at_once():
    """Ray retries a dead GCS address for minutes (C++ warnings every 5 s) and a Ray Client
    one for 30 s; the run says at once that nothing answers there."""
    import socket

    from fedmd_ray.backends.resources import _check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto", None):
            _check_reachable(address)  # something answers, or Ray resolves it itself
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):  # closed now
        with pytest.raises(ResourceError, match=rf"at '{address}': nothing answers at 127.0.0.1:{port} \("):
            _check_reachable(address)


@pytest.mark.slow
def test_a_ray_client_that_answers_but_lets_no_one_in_is_said_with_the_token_fix(monkeypatch):
    """A port that takes the connection but never speaks Ray Client, as a cluster with token
    authentication treats a client that sends no token: Ray says only 'connection timeout'."""
    import socket

    import ray

    from fedmd_ray.backends.resources import init_ray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"ray://127.0.0.1:{listening.getsockname()[1]}"
        with pytest.raises(
            ResourceError, match=r"answered but did not let this run in .* RAY_AUTH_MODE=token"
        ):
            init_ray(address)
    # ... and leaves this process able to start a Ray of its own (it was left in client mode,
    # where every later ray.init failed an assertion).
    assert init_ray(None, num_cpus=1, _node_ip_address="127.0.0.1") is True
    ray.shutdown()
