"""How participants run: `local` (sequentially, in this process) or `ray` (one actor each).

This is the only module that knows about Ray. Both backends expose the same calls, one per
FedMD step, each applied to every participant; scores and the consensus are opaque handles
(arrays for `local`, object refs for `ray`) so the driver never copies them.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmd_ray.config import Config
from fedmd_ray.consensus import form_consensus
from fedmd_ray.errors import ConsensusError, ParticipantError, ResourceError
from fedmd_ray.participant import Participant, ParticipantSpec
from fedmd_ray.tasks import Task

PLACEMENT_TIMEOUT_SECONDS = 60


def _participant_args(task: Task, index: int) -> tuple:
    part = task.private_parts[index]
    return (
        (task.public_val.x, task.public_val.y),
        (part.x, part.y),
        (task.private_test.x, task.private_test.y),
    )


class LocalBackend:
    """Every participant in this process, one after another: for debugging, and the
    reference the benchmarks compare against."""

    name = "local"

    def __init__(self, config: Config, task: Task, specs: Sequence[ParticipantSpec]):
        threads = config.resources.torch_threads or os.cpu_count() or 1
        self.names = [s.name for s in specs]
        self.participants = []
        for spec in specs:
            spec.torch_threads = threads
            self.participants.append(
                self._guard(
                    spec.name,
                    "setup",
                    lambda s=spec: Participant(
                        s, task.public_train.x, task.public_train.y, *_participant_args(task, s.index)
                    ),
                )
            )

    @staticmethod
    def _guard(name: str, phase: str, fn):
        try:
            return fn()
        except Exception as exc:  # any participant failure stops the run with its name
            raise ParticipantError(name, phase, f"{type(exc).__name__}: {exc}") from exc

    def _each(self, phase: str, method: str, *args) -> list:
        return [self._guard(p.name, phase, lambda p=p: getattr(p, method)(*args)) for p in self.participants]

    def describe(self) -> list[dict]:
        return self._each("setup", "describe")

    def transfer(self) -> list[dict]:
        return self._each("transfer", "transfer")

    def logits(self, indices: np.ndarray, round_: int) -> list:
        return self._each("communicate", "logits", indices, round_)

    def aggregate(self, scores: list, plan: dict) -> np.ndarray:
        return form_consensus(scores, self.names, plan)

    def digest(self, consensus: np.ndarray, indices: np.ndarray, round_: int) -> list[dict]:
        return self._each("digest", "digest", consensus, indices, round_)

    def revisit(self, round_: int) -> list[dict]:
        return self._each("revisit", "revisit", round_)

    def evaluate(self, round_: int) -> list[dict]:
        return self._each("evaluate", "evaluate", round_)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        return self._each("upper bound", "upper_bound", pooled_x, pooled_y)

    def wait(self, handles: Any) -> None:
        """Handles are already values here."""

    def shutdown(self) -> None:
        self.participants = []


# ---------------------------------------------------------------- Ray


def _ray():
    import ray

    return ray


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join `address` ('auto', 'ray://...') or start a local Ray, unless one is running."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=True, **kwargs)
    except ConnectionError as exc:
        raise ResourceError(
            f"Could not reach the Ray cluster at '{address}': {exc}. Start it with "
            "`ray start --head` or `ray up cluster.yaml`, or drop --address to run "
            "locally."
        ) from None


def plan_resources(config: Config, cluster: dict[str, float]) -> tuple[float, float, int]:
    """CPUs, GPUs and torch threads for each participant actor, checked against the cluster."""
    n = config.num_participants
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    gpus = config.resources.num_gpus
    if gpus * n > total_gpus + 1e-9:
        raise ResourceError(
            f"{n} participants x {gpus} GPU need {gpus * n:g} GPUs; the Ray cluster has "
            f"{total_gpus:g}. Lower resources.num_gpus (e.g. {math.floor(total_gpus / n * 100) / 100 or 0:g}) "
            "or add GPU nodes."
        )
    cpus = config.resources.num_cpus
    if cpus is None:
        # An even share of the cluster, in hundredths (Ray's resolution for fractions).
        cpus = max(0.01, math.floor(total_cpus / n * 100) / 100)
    elif cpus * n > total_cpus + 1e-9:
        raise ResourceError(
            f"{n} participants x {cpus} CPU need {cpus * n:g} CPUs; the Ray cluster has "
            f"{total_cpus:g}. Lower resources.num_cpus or leave it unset to share evenly."
        )
    threads = config.resources.torch_threads or max(1, int(cpus))
    return cpus, gpus, threads


def concurrency_window(config: Config, cluster: dict[str, float], threads: int) -> int | None:
    """How many participants may compute at once: resources.max_concurrent, or on CPU-only
    runs with more participants than cores, the cores' worth (cores / torch threads). GPU
    runs are not windowed: kernels from many actors overlap on the device."""
    if config.resources.max_concurrent is not None:
        return config.resources.max_concurrent
    cpus = int(cluster.get("CPU", 0))
    if config.resources.num_gpus > 0 or cpus == 0 or config.num_participants * threads <= cpus:
        return None
    return max(1, cpus // threads)


class Aggregator:
    """Forms the consensus next to the data, as a long-lived actor (a plain task's worker
    would be reaped between rounds and cost a process start each time).

    The score refs come wrapped in a list so this actor, not Ray, reads them and can name a
    participant whose scores failed. Returns (status, consensus): the driver reads only the
    small status; the consensus stays in the object store for the participants."""

    def aggregate(self, plan: dict, names: list[str], wrapped: list) -> tuple[dict, Any]:
        ray = _ray()
        scores = []
        for name, ref in zip(names, wrapped):
            try:
                scores.append(ray.get(ref))
            except Exception as exc:  # the participant's own failure, re-raised by Ray
                return {"participant": name, "phase": "communicate", "error": _describe_ray_error(exc)}, None
        try:
            consensus = form_consensus(scores, names, plan)
        except ConsensusError as exc:
            return {"consensus_error": str(exc)}, None
        return {"ok": True, "bytes": int(consensus.nbytes)}, consensus


class RayBackend:
    """One stateful actor per participant, holding its model and data for the whole run."""

    name = "ray"

    def __init__(self, config: Config, task: Task, specs: Sequence[ParticipantSpec]):
        ray = self.ray = _ray()
        init_ray(config.resources.address)
        cpus, gpus, threads = plan_resources(config, ray.cluster_resources())
        self.names = [s.name for s in specs]
        # The public data enters the object store once; actors map it read-only.
        public_x, public_y = ray.put(task.public_train.x), ray.put(task.public_train.y)
        val = ray.put((task.public_val.x, task.public_val.y))
        test = ray.put((task.private_test.x, task.private_test.y))
        actor_cls = ray.remote(Participant)
        tag = uuid.uuid4().hex[:6]
        # num_cpus=0: the participants may hold every CPU, and aggregation must still run.
        self.aggregator = ray.remote(Aggregator).options(num_cpus=0, name=f"fedmd-{tag}/consensus").remote()
        self.actors = []
        self.group = self._placement_group(config.resources.placement, len(specs), cpus, gpus)
        for spec in specs:
            spec.torch_threads = threads
            part = task.private_parts[spec.index]
            options: dict[str, Any] = {"name": f"fedmd-{tag}/{spec.name}", "num_cpus": cpus,
                                       "num_gpus": gpus or None, "max_restarts": 0}
            if self.group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=spec.index)
            actor = actor_cls.options(**options).remote(spec, public_x, public_y, val, (part.x, part.y), test)
            self.actors.append(actor)
        self.window = concurrency_window(config, ray.cluster_resources(), threads)
        self.placement = {"num_cpus": cpus, "num_gpus": gpus, "torch_threads": threads, "window": self.window,
                          "strategy": config.resources.placement, "nodes": self._bundle_nodes()}
        ray.get(self.aggregator.__ray_ready__.remote())

    def _placement_group(self, strategy: str | None, n: int, cpus: float, gpus: float):
        """One bundle per participant, placed by `strategy`; refused clearly if it cannot fit."""
        if strategy is None:
            return None
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        group = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        ready, _ = self.ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_SECONDS)
        if not ready:
            remove_placement_group(group)
            raise ResourceError(
                f"Could not place {n} participants of {bundle} with strategy {strategy} within "
                f"{PLACEMENT_TIMEOUT_SECONDS} s; the cluster has {self.ray.cluster_resources()}. "
                "Use PACK or SPREAD instead of STRICT_*, or fewer resources per participant.")
        return group

    def _bundle_nodes(self) -> list[str] | None:
        if self.group is None:
            return None
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.group).get("bundles_to_node_id", {})
        return [table.get(i) for i in range(len(self.actors))]

    def _get(self, refs: list, phase: str) -> list:
        """Wait for one ref per participant; the first failure stops the run, named."""
        ray = self.ray
        index_of = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as exc:  # RayTaskError wraps the participant's own exception
                name = self.names[index_of[done[0]]]
                raise ParticipantError(name, phase, _describe_ray_error(exc)) from None
        return [_metrics_only(value, self.names[i], phase) for i, value in enumerate(ray.get(list(refs)))]

    def _submit(self, method: str, *args) -> list:
        """Call `method` on every participant, keeping at most `self.window` calls running:
        more busy actors than cores only adds context switches and cache misses."""
        refs: list = []
        running: list = []
        for actor in self.actors:
            if self.window and len(running) >= self.window:
                _, running = self.ray.wait(running, num_returns=1, fetch_local=False)
            ref = getattr(actor, method).remote(*args)
            refs.append(ref)
            running.append(ref)
        return refs

    def _each(self, phase: str, method: str, *args) -> list:
        return self._get(self._submit(method, *args), phase)

    def describe(self) -> list[dict]:
        return self._each("setup", "describe")

    def transfer(self) -> list[dict]:
        return self._each("transfer", "transfer")

    def logits(self, indices: np.ndarray, round_: int) -> list:
        ref = self.ray.put(indices)
        self._indices = ref
        return self._submit("logits", ref, round_)

    def wait(self, handles: Any) -> None:
        """Block until handles are computed, without fetching them to the driver."""
        refs = handles if isinstance(handles, list) else [handles]
        self.ray.wait(refs, num_returns=len(refs), fetch_local=False)

    def aggregate(self, scores: list, plan: dict):
        status_ref, consensus_ref = self.aggregator.aggregate.options(num_returns=2).remote(
            plan, self.names, scores
        )
        try:
            status = self.ray.get(status_ref)
        except Exception as exc:  # the aggregator actor itself failed
            raise ParticipantError("consensus", "aggregate", _describe_ray_error(exc)) from None
        if "consensus_error" in status:
            raise ConsensusError(status["consensus_error"])
        if "participant" in status:
            raise ParticipantError(status["participant"], status["phase"], status["error"])
        return consensus_ref

    def digest(self, consensus, indices: np.ndarray, round_: int) -> list[dict]:
        return self._each("digest", "digest", consensus, self._indices, round_)

    def revisit(self, round_: int) -> list[dict]:
        return self._each("revisit", "revisit", round_)

    def evaluate(self, round_: int) -> list[dict]:
        return self._each("evaluate", "evaluate", round_)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        x, y = self.ray.put(pooled_x), self.ray.put(pooled_y)
        return self._each("upper bound", "upper_bound", x, y)

    def shutdown(self) -> None:
        for actor in [*getattr(self, "actors", []), getattr(self, "aggregator", None)]:
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
        self.actors, self.aggregator = [], None
        if getattr(self, "group", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def _metrics_only(value: Any, name: str, phase: str) -> Any:
    """The driver takes only metrics from participants: scores go to the consensus actor,
    weights and private data never leave. An array here would be a protocol breach."""
    items = value.values() if isinstance(value, dict) else [value]
    for item in items:
        if not isinstance(item, (int, float, str, bool, type(None))):
            raise ParticipantError(name, phase, f"sent the driver a {type(item).__name__}; only "
                                   "metrics (numbers and strings) may reach the driver")
    return value


def _describe_ray_error(exc: Exception) -> str:
    """The participant's own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    kind = type(exc).__name__
    if "ActorDied" in kind or "ActorError" in kind or "ActorUnavailable" in kind:
        return (
            "its actor process died (killed, out of memory, or crashed). "
            f"Ray said: {text[0] if text else kind}"
        )
    return f"{kind}: {text[-1] if text else ''}"


def make_backend(config: Config, task: Task, specs: Sequence[ParticipantSpec]):
    if config.resources.backend == "local":
        return LocalBackend(config, task, specs)
    return RayBackend(config, task, specs)
