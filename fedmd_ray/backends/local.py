"""The `local` backend: every participant in this process, one after another. For
debugging, and the reference the benchmarks and the tests compare the Ray backend against."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmd_ray.backends.steps import Announce, Step, phase_of
from fedmd_ray.config import Config
from fedmd_ray.consensus import form_consensus
from fedmd_ray.errors import FedMDError, ParticipantError
from fedmd_ray.participant import Participant, ParticipantSpec, check_models
from fedmd_ray.tasks import Task, participant_args


def guard(name: str, phase: str, fn: Callable[[], Any]) -> Any:
    """Run one participant call; any failure stops the run with the participant's name."""
    try:
        return fn()
    except FedMDError:
        raise
    except Exception as exc:
        raise ParticipantError(name, phase, f"{type(exc).__name__}: {exc}") from exc


class LocalBackend:
    name = "local"
    runs_ahead = False
    """One participant at a time leaves no idle core for the next round's scores to fill."""

    def __init__(
        self,
        config: Config,
        task: Task,
        specs: Sequence[ParticipantSpec],
        report: Callable[[dict], None] | None = None,
    ):
        check_models(list(specs), task.public_train.x[:2], task.num_classes)
        threads = config.resources.torch_threads or os.cpu_count() or 1
        self.names = [s.name for s in specs]
        self.events: list[dict] = []
        self.report = report
        self.participants = []
        for spec in specs:
            spec.torch_threads = threads
            participant = guard(
                spec.name,
                "setup",
                lambda s=spec: Participant(
                    s, task.public_train.x, task.public_train.y, *participant_args(task, s.index)
                ),
            )
            participant.report = report
            self.participants.append(participant)

    def _each(self, phase: str, method: str, who: Sequence[int] | None, *args: Any) -> list:
        chosen = range(len(self.participants)) if who is None else who
        out = []
        for i in chosen:
            out.append(guard(self.names[i], phase, lambda p=self.participants[i]: getattr(p, method)(*args)))
            if self.report is not None:
                self.report({"kind": "done", "participant": self.names[i], "phase": phase})
        return out

    def describe(self) -> list[dict]:
        return self._each("setup", "describe", None)

    def transfer(self) -> list[dict]:
        return self._each("transfer", "transfer", None)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        return self._each("upper_bound", "upper_bound", None, pooled_x, pooled_y)

    def logits(self, who: Sequence[int], indices: np.ndarray, round_: int) -> tuple[list, list, list]:
        """(answered, late, scores): sequentially, everyone answers."""
        return list(who), [], self._each("communicate", "logits", who, indices, round_)

    def aggregate(self, scores: list, names: list[str], plan: dict) -> np.ndarray:
        return form_consensus(scores, names, plan)

    def digest(
        self, who: Sequence[int], consensus: np.ndarray, indices: np.ndarray, round_: int
    ) -> list[dict]:
        return self._each("digest", "digest", who, consensus, indices, round_)

    def revisit(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("revisit", "revisit", who, round_)

    def evaluate(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("evaluate", "evaluate", who, round_)

    def steps(
        self, steps: Sequence[Step], announce: Announce, ahead: bool = False
    ) -> tuple[list[Any], list[float]]:
        """Run `steps` (method, who, args), each phase for everyone before the next: (each
        step's results, each step's wall seconds). Never `ahead` (see runs_ahead)."""
        if ahead:
            raise ValueError("the local backend does not run the next round's communicate ahead")
        results, walls = [], []
        for method, who, args in steps:
            announce([phase_of(method)], list(who))
            start = time.perf_counter()
            results.append(getattr(self, method)(who, *args))
            walls.append(time.perf_counter() - start)
        return results, walls

    def end_round(self, round_: int, busy: Sequence[int] = ()) -> None:
        """Nothing to keep: participants live in this process."""

    def save(self, directory: Path) -> dict[str, dict]:
        """Each participant writes its own state file; returns name -> {file, sha256, bytes}."""
        saved = {}
        for name, p in zip(self.names, self.participants):
            path = directory / f"{name}.pt"
            saved[name] = {"file": path.name, **guard(name, "checkpoint", lambda p=p, f=path: p.save(str(f)))}
        return saved

    def restore(self, directory: Path, entries: dict[str, dict]) -> list[dict]:
        return [
            guard(
                name, "resume", lambda p=p, e=entries[name]: p.load(str(directory / e["file"]), e["sha256"])
            )
            for name, p in zip(self.names, self.participants)
        ]

    def shutdown(self) -> None:
        self.participants = []
        # Participants live in the caller's process: hand their GPU memory back, or a
        # notebook (or a benchmark's next run) keeps the whole cache (11 GiB for the ten
        # paper CNNs at public subset 5000).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
