"""--log tensorboard writes event files TensorBoard's own reader loads; fedmd-ray compare
puts several runs in one table and one figure."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from fedmd_ray.cli import main
from fedmd_ray.config import ConfigError, from_dict
from fedmd_ray.fedmd import run


def test_tensorboard_event_files_hold_every_rounds_metrics(out_dir):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed",
    )
    config = tiny_config(log=["tensorboard"], sharing={"clip": 5.0, "noise_multiplier": 2.0})
    result = run(config, out_dir, progress=None)
    files = list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = event_accumulator.EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"mean/accuracy", "mean/gain", "mean/bytes", "privacy/epsilon"} <= set(tags)
    names = [r.participant for r in result.summary]
    for name in names:
        assert f"participant/{name}/accuracy" in tags and f"participant/{name}/gain" in tags
    # The same numbers as metrics.parquet, round by round.
    rows = pq.read_table(out_dir / "metrics.parquet").to_pylist()
    for name in names:
        logged = [(e.step, e.value) for e in acc.Scalars(f"participant/{name}/accuracy")]
        expected = [
            (r["round"], r["accuracy"]) for r in rows if r["participant"] == name and r["phase"] == "evaluate"
        ]
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-6)
    eps = [e.value for e in acc.Scalars("privacy/epsilon")]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert any("config" in tag for tag in acc.Tags()["tensors"])  # the config, as text


def test_log_names_are_checked(capsys):
    assert from_dict({"log": "tensorboard, mlflow"}).log == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="'log' is 'tensorbord'.*Did you mean 'tensorboard'"):
        from_dict({"log": ["tensorbord"]})
    assert main(["run", "--log", "wandb", "--out", "/nonexistent/x"]) == 1
    assert "'log' is 'wandb'; it must be one of tensorboard, mlflow" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_two_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(), a, progress=None)
    run(tiny_config(train={"digest_loss": "kl"}), b, progress=None)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert "train.digest_loss" in header and "FedMD last 3" in header
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and '`"mae"`' in rows[0] and '`"kl"`' in rows[1]
    for path, row in zip((a, b), rows):
        gain = json.loads((path / "summary.json").read_text())["mean"]["gain"]
        assert f"{100 * gain:+.1f}" in row
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 1
    # Each of these is one line, not a traceback: an --out that is a file, a damaged run.
    assert "is a file" in _refused(capsys, "compare", str(a), str(b), "--out", str(a / "summary.md"))
    (b / "summary.json").write_text("{not json")
    assert "not a finished fedmd-ray run" in _refused(capsys, "compare", str(a), str(b))
    (b / "summary.json").write_text("{}")
    for part in (b / "metrics.parquet").iterdir():
        part.write_bytes(b"damaged")
    assert "metrics.parquet cannot be read" in _refused(capsys, "compare", str(a), str(b))


def _refused(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_tracker_that_cannot_start_is_refused_before_any_work(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("MLflow is installed here: nothing to refuse")
    said: list[str] = []
    with pytest.raises(ConfigError, match="--log mlflow needs MLflow: pip install mlflow"):
        run(tiny_config(log=["mlflow"], resources={"backend": "ray"}), tmp_path / "run", progress=said.append)
    assert said == [] and not (tmp_path / "run").exists()  # no participant started, no folder written
