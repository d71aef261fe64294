"""The `local` backend: every participant in this process, one after another. For
debugging, and the reference the benchmarks and the tests compare the Ray backend against:
each participant runs on the threads the Ray backend would give it, so both compute the
same numbers."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedmd_ray.backends.resources import local_cpus, participant_threads
from fedmd_ray.config import Config
from fedmd_ray.consensus import form_consensus
from fedmd_ray.errors import FedMDError, ParticipantError, format_trace
from fedmd_ray.participant import Participant, build_participant, run_call
from fedmd_ray.phases import Phase
from fedmd_ray.plans import RoundPlan
from fedmd_ray.progress import phase_event
from fedmd_ray.protocol import ConsensusPlan, Event, Scores, Updates
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.storage import Storage
from fedmd_ray.tasks import Task, participant_args


class LocalBackend:
    name = "local"
    placement = None

    def __init__(
        self,
        config: Config,
        task: Task,
        specs: Sequence[ParticipantSpec],
        report: Callable[[dict], None] | None = None,
    ):
        self.threads = threads = participant_threads(config, local_cpus())
        self.config = config
        self.names = [s.name for s in specs]
        self.report = report
        self.participants: list[Participant] = []
        for spec in specs:
            spec.torch_threads = threads
            participant = build_participant(
                spec, task.public_train.x, task.public_train.y, *participant_args(task, spec.index)
            )
            participant.report = report
            self.participants.append(participant)

    def _each(
        self, phase: Phase, who: Sequence[int], args: Callable[[int], tuple] | tuple = ()
    ) -> list[dict]:
        """`phase` for each of `who` in turn: their metrics (and payloads, for scores)."""
        out = []
        for i in who:
            call_args = args(i) if callable(args) else args
            try:
                out.append(run_call(self.participants[i], phase, *call_args))
            except FedMDError:
                raise
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                raise ParticipantError(self.names[i], phase, text, format_trace(exc)) from exc
            if self.report is not None:
                self.report({"kind": "done", "participant": self.names[i], "phase": phase})
        return out

    def _announce(self, phase: Phase, who: Sequence[int], round_: int = 0) -> None:
        if self.report is not None:
            names = [self.names[i] for i in who]
            self.report(phase_event([phase], round_, self.config.train.rounds, names))

    def _everyone(self, phase: Phase, *args: Any) -> list[dict]:
        who = range(len(self.participants))
        self._announce(phase, who)
        return [metrics for metrics, _ in self._each(phase, who, args)]

    def describe(self) -> list[dict]:
        return self._everyone(Phase.SETUP)

    def transfer(self) -> list[dict]:
        return self._everyone(Phase.TRANSFER)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        return self._everyone(Phase.UPPER_BOUND, pooled_x, pooled_y)

    def communicate(self, plan: RoundPlan) -> Scores:
        """Sequentially, everyone answers."""
        self._announce(Phase.COMMUNICATE, plan.chosen, plan.round)
        start = time.perf_counter()
        answers = self._each(Phase.COMMUNICATE, plan.chosen, (plan.indices, plan.round))
        metrics = [m for m, _ in answers]
        payloads = [p for _, p in answers]
        return Scores(plan, list(plan.chosen), [], payloads, metrics, time.perf_counter() - start)

    def aggregate(self, scores: Scores, plan: ConsensusPlan) -> np.ndarray:
        payloads, scores.payloads = scores.payloads, []
        return form_consensus(payloads, [self.names[i] for i in scores.answered], plan)

    def update(
        self, scores: Scores, consensus: np.ndarray, evaluate: Sequence[int], upcoming: RoundPlan | None
    ) -> Updates:
        """Each phase for everyone before the next; `upcoming` waits for its own round."""
        plan = scores.plan
        steps = (
            (Phase.DIGEST, scores.answered, (consensus, plan.indices, plan.round)),
            (Phase.REVISIT, scores.answered, (plan.round,)),
            (Phase.EVALUATE, list(evaluate), (plan.round,)),
        )
        results, walls = [], {}
        for phase, who, args in steps:
            self._announce(phase, who, plan.round)
            start = time.perf_counter()
            results.append([metrics for metrics, _ in self._each(phase, who, args)])
            walls[phase] = time.perf_counter() - start
        return Updates(*results, walls=walls)

    def end_round(self, round_: int, busy: Sequence[int] = ()) -> list[Event]:
        """Nothing to keep: participants live in this process, and nothing happens to them."""
        return []

    def save(self, storage: Storage, folder: str) -> dict[str, dict]:
        """Each participant writes its own state file into `folder` of `storage`; returns
        name -> {file, sha256, bytes}."""
        files = [f"{name}.pt" for name in self.names]
        answers = self._each(
            Phase.CHECKPOINT, range(len(self.names)), lambda i: (storage.location(folder, files[i]),)
        )
        return {
            name: {"file": file, "sha256": m["sha256"], "bytes": m["bytes"]}
            for name, file, (m, _) in zip(self.names, files, answers)
        }

    def restore(self, storage: Storage, folder: str, entries: dict[str, dict]) -> None:
        def load_args(i: int) -> tuple:
            entry = entries[self.names[i]]
            return storage.location(folder, entry["file"]), entry["sha256"]

        who = range(len(self.names))
        self._announce(Phase.RESUME, who)
        self._each(Phase.RESUME, who, load_args)

    def shutdown(self) -> None:
        self.participants = []
        # Participants live in the caller's process: hand their GPU memory back, or a
        # notebook (or a benchmark's next run) keeps the whole cache (11 GiB for the ten
        # paper CNNs at public subset 5000).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
