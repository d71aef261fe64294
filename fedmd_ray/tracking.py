"""Per-round metrics and the config, to the experiment trackers researchers already use.

`--log tensorboard,mlflow` (config `log`): after every round, each participant's accuracy,
gain over its lower bound, test loss, bytes moved and (with DP) epsilon, and their means,
go to TensorBoard event files in the run folder (`tensorboard --logdir RUN_DIR`) and/or to
an MLflow run (tracking URI from MLFLOW_TRACKING_URI, else ./mlruns). Inside a Ray Tune
search, Tune's own loggers and callbacks receive the same numbers through tune.report.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from fedmd_ray.config import flatten
from fedmd_ray.errors import ConfigError
from fedmd_ray.phases import Phase
from fedmd_ray.report import ALL, is_result
from fedmd_ray.storage import Storage


class Tracker(Protocol):
    def log_round(self, round_: int, scalars: dict[str, float]) -> None: ...

    def flush(self) -> None:
        """What is logged so far is in the run's storage."""

    def close(self) -> None: ...


class TensorBoard:
    """Event files under RUN_DIR/tensorboard, written with tensorboardX (installed with
    ray[tune]) or, without it, torch.utils.tensorboard. A run stored at a URI writes them
    into a local folder first and copies them over as each round's metrics are written."""

    def __init__(self, storage: Storage, config: dict, name: str):
        SummaryWriter = _summary_writer()  # noqa: N806 - a class
        self.storage = storage
        self.local = (
            Path(storage.path("tensorboard")) if storage.local else Path(tempfile.mkdtemp(prefix="fedmd-tb-"))
        )
        self.writer = SummaryWriter(logdir=str(self.local), comment=name)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_round(self, round_: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, round_)
        self.writer.flush()  # a run that stops early still shows its rounds

    def flush(self) -> None:
        if not self.storage.local:
            for f in self.local.rglob("*"):
                if f.is_file():
                    self.storage.write_bytes(f"tensorboard/{f.relative_to(self.local)}", f.read_bytes())

    def close(self) -> None:
        self.writer.close()
        self.flush()
        if not self.storage.local:
            shutil.rmtree(self.local, ignore_errors=True)


class MLflow:
    def __init__(self, storage: Storage, config: dict, name: str):
        self.mlflow = mlflow = _mlflow()
        self.run = mlflow.start_run(run_name=name)
        flat = flatten(config)
        # MLflow caps a param's value at 6000 characters and takes at most 100 per call.
        items = [(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.set_tag("fedmd_ray.run_dir", str(storage))

    def log_round(self, round_: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in scalars.items()}, step=round_)

    def flush(self) -> None:
        """MLflow keeps its own store."""

    def close(self) -> None:
        self.mlflow.end_run()


def _mlflow_key(key: str) -> str:
    # MLflow keys take letters, digits, _ - . space / only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _summary_writer() -> type:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--log tensorboard needs tensorboardX (pip install tensorboardX; it comes with "
                "ray[tune]) or the tensorboard package."
            ) from None
    return SummaryWriter


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--log mlflow needs MLflow: pip install mlflow") from None
    return mlflow


def check_trackers(names: list[str], storage: Storage | None) -> None:
    """Refuse, before any work (no participant started, no folder written), trackers that
    cannot start here."""
    if names and storage is None:
        raise ConfigError("--log needs a results folder (the run was started without one).")
    for name in names:
        {"tensorboard": _summary_writer, "mlflow": _mlflow}[name]()


def open_trackers(names: list[str], storage: Storage | None, config: dict, run_name: str) -> list[Tracker]:
    check_trackers(names, storage)
    makers = {"tensorboard": TensorBoard, "mlflow": MLflow}
    return [makers[n](storage, config, run_name) for n in names]


def round_scalars(rows: list[dict], lower: dict[str, float]) -> dict[str, float]:
    """One round's rows (metrics.parquet's) -> the scalars the trackers get, per participant
    under 'participant/NAME/...' and their means under 'mean/...'."""
    out: dict[str, float] = {}
    acc, gains, moved = [], [], {}
    for r in rows:
        name = r["participant"]
        if is_result(r, Phase.EVALUATE):
            out[f"participant/{name}/accuracy"] = r["accuracy"]
            acc.append(r["accuracy"])
            if r.get("loss") is not None:
                out[f"participant/{name}/loss"] = r["loss"]
            if name in lower:
                out[f"participant/{name}/gain"] = r["accuracy"] - lower[name]
                gains.append(r["accuracy"] - lower[name])
        if (is_result(r, Phase.COMMUNICATE) or is_result(r, Phase.DIGEST)) and r["round"] >= 1:
            moved[name] = moved.get(name, 0) + (r.get("bytes_sent") or 0) + (r.get("bytes_received") or 0)
        if r["phase"] == Phase.COMMUNICATE and name == ALL and r.get("epsilon") is not None:
            if not math.isinf(r["epsilon"]):
                out["privacy/epsilon"] = r["epsilon"]
    for name, b in moved.items():
        out[f"participant/{name}/bytes"] = float(b)
    if acc:
        out["mean/accuracy"] = sum(acc) / len(acc)
    if gains:
        out["mean/gain"] = sum(gains) / len(gains)
    if moved:
        out["mean/bytes"] = sum(moved.values()) / len(moved)
    return out
