"""How participants run: `local` (sequentially, in this process) or `ray` (one actor each).

This is the only module that knows about Ray. Both backends expose the same calls, one per
FedMD step, each applied to every participant; scores and the consensus are opaque handles
(arrays for `local`, object refs for `ray`) so the driver never copies them.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmd_ray import sharing
from fedmd_ray.config import Config
from fedmd_ray.consensus import form_consensus
from fedmd_ray.errors import ConsensusError, FedMDError, ParticipantError, ResourceError
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
        self.events: list[dict] = []
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
        except FedMDError:
            raise
        except Exception as exc:  # any participant failure stops the run with its name
            raise ParticipantError(name, phase, f"{type(exc).__name__}: {exc}") from exc

    def _each(self, phase: str, method: str, who: Sequence[int] | None, *args) -> list:
        chosen = range(len(self.participants)) if who is None else who
        return [
            self._guard(self.names[i], phase, lambda p=self.participants[i]: getattr(p, method)(*args))
            for i in chosen
        ]

    def describe(self) -> list[dict]:
        return self._each("setup", "describe", None)

    def transfer(self) -> list[dict]:
        return self._each("transfer", "transfer", None)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        return self._each("upper bound", "upper_bound", None, pooled_x, pooled_y)

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

    def end_round(self, round_: int) -> None:
        """Nothing to keep: participants live in this process."""

    def save(self, directory: Path) -> dict[str, dict]:
        """Each participant writes its own state file; returns name -> {file, sha256, bytes}."""
        saved = {}
        for name, p in zip(self.names, self.participants):
            path = directory / f"{name}.pt"
            saved[name] = {
                "file": path.name,
                **self._guard(name, "checkpoint", lambda p=p, f=path: p.save(str(f))),
            }
        return saved

    def restore(self, directory: Path, entries: dict[str, dict]) -> list[dict]:
        return [
            self._guard(
                name, "resume", lambda p=p, e=entries[name]: p.load(str(directory / e["file"]), e["sha256"])
            )
            for name, p in zip(self.names, self.participants)
        ]

    def shutdown(self) -> None:
        self.participants = []


# ---------------------------------------------------------------- Ray


def _ray():
    import ray

    return ray


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join `address` ('auto', 'ray://...') or start a local Ray, unless one is running.
    Without an address, a Ray job's RAY_ADDRESS is honoured; otherwise the run gets a Ray
    of its own rather than joining whichever `ray start` cluster this machine last ran."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    try:
        ray.init(address=address, log_to_driver=True, **kwargs)
    except ConnectionError as exc:
        raise ResourceError(
            f"Could not reach the Ray cluster at '{address}': {exc}. Start it with "
            "`ray start --head` or `ray up cluster.yaml`, or drop --address to run "
            "locally."
        ) from None


def even_share(node_cpus: list[float], n: int) -> float:
    """The largest CPU share, in hundredths (Ray's resolution for fractions), of which `n`
    fit on these nodes: an even split of the total may not, when nodes are small (4 nodes of
    1 CPU hold only 8 actors of 0.4)."""
    share = math.floor(sum(node_cpus) / n * 100) / 100
    while share > 0.01 and sum(math.floor(c / share + 1e-9) for c in node_cpus) < n:
        share = round(share - 0.01, 2)
    return max(0.01, share)


def plan_resources(
    config: Config, cluster: dict[str, float], actors: int | None = None, node_cpus: list[float] | None = None
) -> tuple[float, float, int]:
    """CPUs, GPUs and torch threads for each participant actor, checked against the cluster
    (its total, and with `node_cpus`, what fits node by node)."""
    n = actors or config.num_participants
    what = "actors" if actors else "participants"
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    gpus = config.resources.num_gpus
    if gpus * n > total_gpus + 1e-9:
        raise ResourceError(
            f"{n} {what} x {gpus} GPU need {gpus * n:g} GPUs; the Ray cluster has "
            f"{total_gpus:g}. Lower resources.num_gpus (e.g. {math.floor(total_gpus / n * 100) / 100 or 0:g}) "
            "or add GPU nodes."
        )
    cpus = config.resources.num_cpus
    if cpus is None:
        cpus = even_share(node_cpus or [total_cpus], n)
    elif cpus * n > total_cpus + 1e-9:
        raise ResourceError(
            f"{n} {what} x {cpus} CPU need {cpus * n:g} CPUs; the Ray cluster has "
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


MUTATING = frozenset({"transfer", "load", "logits", "digest", "revisit"})
"""Calls that change a participant's state: replayed after a restart, and in a pool, the
calls after which its new state is kept."""


def _split(method: str, out: Any, seconds: float) -> tuple[Any, Any]:
    """(metrics for the driver, payload for the object store) of one participant call."""
    if method == "logits":
        return {"bytes_sent": int(sharing.nbytes(out)), "seconds": seconds}, out
    if method == "get_state":
        return {"bytes": len(out)}, out
    return out, None


class ParticipantActor(Participant):
    """A participant as a Ray actor. Every call answers (metrics, payload) as two objects, so
    the driver reads the small metrics (and learns of failures) while the payload (scores,
    state) stays in the object store for whoever needs it."""

    def __init__(self, *args: Any, restored: bool = False):
        super().__init__(*args)
        self.restored = restored

    def call(self, method: str, *args: Any) -> tuple[Any, Any]:
        start = time.perf_counter()
        out = getattr(self, method)(*args)
        return _split(method, out, time.perf_counter() - start)


class PoolWorker:
    """One actor of a pool serving many participants: for each call it rebuilds the
    participant from its spec, private data and state, runs the call, and hands the new
    state back to the object store. The public data and test set stay mapped here."""

    def __init__(self, public_x: np.ndarray, public_y: np.ndarray, val: tuple, test: tuple, threads: int):
        torch_threads(threads)
        self.shared = (public_x, public_y, val)
        self.test = test

    def call(
        self,
        spec: ParticipantSpec,
        private: tuple,
        state: bytes | None,
        replay: bool,
        method: str,
        *args: Any,
    ) -> tuple[Any, Any, bytes | None]:
        participant = Participant(spec, *self.shared, private, self.test)
        if state is not None:
            participant.set_state(state, restored=replay)
        participant.restored = participant.restored or replay
        start = time.perf_counter()
        out = getattr(participant, method)(*args)
        metrics, payload = _split(method, out, time.perf_counter() - start)
        return metrics, payload, participant.get_state() if method in MUTATING else None


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class _Call:
    """One submitted participant call, kept until it answers so it can be resubmitted."""

    __slots__ = ("index", "method", "args", "state", "metrics", "payload", "new_state", "actor", "confirms")

    def __init__(self, index: int, method: str, args: tuple, state: Any = None):
        self.index, self.method, self.args, self.state = index, method, args, state
        self.metrics = self.payload = self.new_state = self.actor = None
        self.confirms = False  # queued behind an unconfirmed state snapshot


class RayBackend:
    """Participants as Ray actors: one stateful actor each, or (resources.actors) a pool of
    actors that participants take turns on, their state kept in the object store."""

    name = "ray"

    def __init__(self, config: Config, task: Task, specs: Sequence[ParticipantSpec]):
        ray = self.ray = _ray()
        init_ray(config.resources.address)
        self.config = config
        self.specs = list(specs)
        self.names = [s.name for s in specs]
        self.events: list[dict] = []
        n = len(specs)
        pool = config.resources.actors is not None and config.resources.actors < n
        self.pool_size = config.resources.actors if pool else None
        slots = self.pool_size or n
        self.group, self.own_group, offset = self._trial_group(slots)
        if self.group is not None:
            bundle = self.group.bundle_specs[offset]
            cpus, gpus = float(bundle.get("CPU", 0)), float(bundle.get("GPU", 0))
            threads = config.resources.torch_threads or max(1, int(cpus))
        else:
            node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
            cpus, gpus, threads = plan_resources(config, ray.cluster_resources(), self.pool_size, node_cpus)
            self.group = self._placement_group(config.resources.placement, slots, cpus, gpus)
            self.own_group, offset = self.group is not None, 0
        self.threads = threads
        for spec in specs:
            spec.torch_threads = threads
        # The public data enters the object store once; actors map it read-only.
        self.public = (ray.put(task.public_train.x), ray.put(task.public_train.y))
        self.val = ray.put((task.public_val.x, task.public_val.y))
        self.test = ray.put((task.private_test.x, task.private_test.y))
        # Private data goes to its participant's actor (or, in a pool, travels with each call).
        self.private = [ray.put((p.x, p.y)) for p in task.private_parts]
        self.tag = uuid.uuid4().hex[:6]
        self.options = [self._actor_options(i, cpus, gpus, offset) for i in range(slots)]
        # num_cpus=0: the participants may hold every CPU, and aggregation must still run.
        aggregator_options: dict[str, Any] = {"num_cpus": 0, "name": f"fedmd-{self.tag}/consensus"}
        if not self.own_group and self.group is not None:
            aggregator_options["scheduling_strategy"] = self._in_group(0)
        self.aggregator = ray.remote(Aggregator).options(**aggregator_options).remote()
        self.restarts = [0] * slots
        self.late: set[int] = set()
        self.seconds: dict[str, dict[int, float]] = {}  # method -> participant -> last seconds
        self.journal: list[list[_Call]] = [[] for _ in range(n)]
        self.saved: list[Any] = [None] * n  # confirmed state snapshots (dedicated actors)
        self.snapshot: list[tuple[Any, int] | None] = [None] * n  # (state ref, journal position), unconfirmed
        self.state: list[Any] = [None] * n  # current state refs (pool)
        self.actors = [self._start(k) for k in range(slots)]
        self.window = None if pool else concurrency_window(config, ray.cluster_resources(), threads)
        self.placement = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "torch_threads": threads,
            "window": self.window,
            "strategy": config.resources.placement,
            "actors": slots,
            "in_trial_group": self.group is not None and not self.own_group,
            "nodes": self._bundle_nodes(slots, offset),
        }
        ray.get(self.aggregator.__ray_ready__.remote())

    # ------------------------------------------------------------ placement

    def _trial_group(self, slots: int):
        """Inside a Ray Tune trial, the trial's placement group: bundle 0 is the trial's own
        process, bundles 1..n the participants' actors."""
        if self.config.resources.placement is not None:
            return None, False, 0
        from ray.util import get_current_placement_group

        group = get_current_placement_group()
        if group is None:
            return None, False, 0
        if len(group.bundle_specs) < slots + 1:
            raise ResourceError(
                f"The Ray Tune trial's placement group has {len(group.bundle_specs)} bundles; this run "
                f"needs {slots + 1} (one for the trial, one per participant actor). Size it with "
                "fedmd_ray.tune.trial_resources(config)."
            )
        return group, False, 1

    def _in_group(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    def _actor_options(self, slot: int, cpus: float, gpus: float, offset: int) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus or None, "max_restarts": 0}
        if self.group is not None:
            options["scheduling_strategy"] = self._in_group(slot + offset)
        return options

    def _placement_group(self, strategy: str | None, n: int, cpus: float, gpus: float):
        """One bundle per actor, placed by `strategy`; refused clearly if it cannot fit."""
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
                "Use PACK or SPREAD instead of STRICT_*, or fewer resources per participant."
            )
        return group

    def _bundle_nodes(self, slots: int, offset: int) -> list[str] | None:
        if self.group is None:
            return None
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.group).get("bundles_to_node_id", {})
        return [table.get(k + offset) for k in range(slots)]

    # ------------------------------------------------------------ actors

    def _start(self, slot: int, restored: bool = False):
        """Start the actor of `slot`: participant `slot`'s own actor, or pool worker `slot`."""
        generation = f"-r{self.restarts[slot]}" if self.restarts[slot] else ""
        options = dict(self.options[slot])
        if self.pool_size:
            options["name"] = f"fedmd-{self.tag}/pool-{slot:02d}{generation}"
            cls = self.ray.remote(PoolWorker)
            return cls.options(**options).remote(*self.public, self.val, self.test, self.threads)
        spec = self.specs[slot]
        options["name"] = f"fedmd-{self.tag}/{spec.name}{generation}"
        cls = self.ray.remote(ParticipantActor)
        return cls.options(**options).remote(
            spec, *self.public, self.val, self.private[slot], self.test, restored=restored
        )

    def _slot(self, index: int) -> int:
        return index % self.pool_size if self.pool_size else index

    def _send(self, call: _Call, replay: bool = False) -> tuple[Any, Any]:
        actor = call.actor = self.actors[self._slot(call.index)]
        if self.pool_size:
            i = call.index
            refs = actor.call.options(num_returns=3).remote(
                self.specs[i], self.private[i], call.state, replay, call.method, *call.args
            )
            call.new_state = refs[2] if call.method in MUTATING else None  # else a ref to None
            return refs[0], refs[1]
        return tuple(actor.call.options(num_returns=2).remote(call.method, *call.args))

    def _submit(
        self, who: Sequence[int], method: str, *args: Any, args_for: Callable[[int], tuple] | None = None
    ) -> dict[Any, _Call]:
        """Call `method` on each participant in `who` with `args` (participant i with
        `args_for(i)` when given); returns metrics ref -> call. With a window (CPU runs with
        more actors than cores), at most that many run at once: more busy actors than cores
        only adds context switches and cache misses."""
        calls: dict[Any, _Call] = {}
        running: list = []
        if self.window:
            # Longest first (by last time's seconds): a window of workers finishes sooner
            # when the long calls do not come last. Results do not depend on the order.
            last = self.seconds.get(method, {})
            who = sorted(who, key=lambda i: -last.get(i, 0.0))
        for i in who:
            if self.window and len(running) >= self.window:
                _, running = self.ray.wait(running, num_returns=1, fetch_local=False)
            call = _Call(i, method, args_for(i) if args_for else args, self.state[i])
            metrics, call.payload = self._send(call)
            if not self.pool_size and method in MUTATING:
                self.journal[i].append(call)
            call.confirms = self.snapshot[i] is not None
            calls[metrics] = call
            running.append(metrics)
        return calls

    def _restart(self, call: _Call, phase: str, error: str) -> tuple[Any, Any]:
        """The actor under `call` died: start a new one, bring it back to where the dead one
        was (its last round's state, then this round's calls so far), and resend `call`."""
        slot = self._slot(call.index)
        if self.actors[slot] is not call.actor:
            # Another call queued on the same dead pool actor already replaced it.
            return self._send(call, replay=True)
        who = f"pool actor {slot} (serving {self.names[call.index]})" if self.pool_size else None
        if self.restarts[slot] >= self.config.resources.max_restarts:
            raise ParticipantError(
                self.names[call.index],
                phase,
                f"{error} (restarted {self.restarts[slot]} times already; resources.max_restarts="
                f"{self.config.resources.max_restarts})",
            )
        self.restarts[slot] += 1
        self.events.append(
            {
                "participant": self.names[call.index],
                "phase": phase,
                "note": f"restarted ({who or 'actor'} died)",
            }
        )
        self.actors[slot] = self._start(slot, restored=True)
        if self.pool_size:
            return self._send(call, replay=True)  # the call carries the state it started from
        actor, i = self.actors[slot], call.index
        self.snapshot[i] = None  # unconfirmed: it may never have been taken
        if self.saved[i] is not None:
            actor.set_state.remote(self.saved[i])
        journal = self.journal[i]
        for earlier in journal[: journal.index(call)] if call in journal else journal:
            actor.call.options(num_returns=2).remote(earlier.method, *earlier.args)
        return self._send(call)

    def _gather(
        self, calls: dict[Any, _Call], phase: str, need: int | None = None, deadline: float | None = None
    ) -> dict[int, _Call]:
        """Wait for the calls' metrics: all of them, or `need` of them (after `deadline`
        seconds, when given). A participant that raised stops the run, named; one whose actor
        died is restarted and its call resent."""
        ray = self.ray
        need = len(calls) if need is None else need
        pending = dict(calls)
        done: dict[int, _Call] = {}
        start = time.perf_counter()
        while pending:
            # Before the deadline: wait for everyone. After it (or without one): stop at the
            # quorum, and until then keep waiting for whoever answers next.
            left = None if deadline is None else deadline - (time.perf_counter() - start)
            if len(done) >= need and (left is None or left <= 0):
                break
            timeout = left if left is not None and left > 0 else None
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                continue  # the deadline passed; go on once the quorum is in
            call = pending.pop(ready[0])
            try:
                call.metrics = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                metrics, call.payload = self._restart(call, phase, _describe_ray_error(exc))
                pending[metrics] = call
                continue
            except Exception as exc:  # RayTaskError wraps the participant's own exception
                if isinstance(getattr(exc, "cause", None), FedMDError):
                    # Ours already says what is wrong and how to fix it, as on the local backend.
                    raise exc.cause from None
                raise ParticipantError(self.names[call.index], phase, _describe_ray_error(exc)) from None
            _metrics_only(call.metrics, self.names[call.index], phase)
            if isinstance(call.metrics, dict) and call.metrics.get("seconds") is not None:
                self.seconds.setdefault(call.method, {})[call.index] = call.metrics["seconds"]
            if self.pool_size and call.new_state is not None:
                self.state[call.index] = call.new_state
            if call.confirms and self.snapshot[call.index] is not None:
                # The actor answered a call queued after its snapshot, so the snapshot is in.
                state, position = self.snapshot[call.index]
                self.saved[call.index] = state
                del self.journal[call.index][:position]
                self.snapshot[call.index] = None
            done[call.index] = call
        return done

    def _each(self, phase: str, method: str, who: Sequence[int] | None, *args: Any) -> list:
        who = range(len(self.specs)) if who is None else who
        done = self._gather(self._submit(who, method, *args), phase)
        return [done[i].metrics for i in who]

    # ------------------------------------------------------------ the FedMD steps

    def describe(self) -> list[dict]:
        return self._each("setup", "describe", None)

    def transfer(self) -> list[dict]:
        return self._each("transfer", "transfer", None)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        x, y = self.ray.put(pooled_x), self.ray.put(pooled_y)
        return self._each("upper bound", "upper_bound", None, x, y)

    def logits(self, who: Sequence[int], indices: np.ndarray, round_: int) -> tuple[list, list, list]:
        """(answered, late, score refs): waits for everyone, or with resources.quorum and
        deadline_s, for those that answer in time."""
        self._indices = self.ray.put(indices)
        r = self.config.resources
        need = len(who) if r.quorum >= 1 else max(1, math.ceil(r.quorum * len(who)))
        done = self._gather(
            self._submit(who, "logits", self._indices, round_), "communicate", need, r.deadline_s
        )
        answered = [i for i in who if i in done]
        late = [i for i in who if i not in done]
        self.late = set(late)
        return answered, late, [done[i].payload for i in answered]

    def aggregate(self, scores: list, names: list[str], plan: dict):
        status_ref, consensus_ref = self.aggregator.aggregate.options(num_returns=2).remote(
            plan, names, scores
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

    def digest(self, who: Sequence[int], consensus, indices: np.ndarray, round_: int) -> list[dict]:
        return self._each("digest", "digest", who, consensus, self._indices, round_)

    def revisit(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("revisit", "revisit", who, round_)

    def evaluate(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("evaluate", "evaluate", who, round_)

    def end_round(self, round_: int) -> None:
        """Keep each participant's state in the object store, so an actor that dies later is
        restarted from here (a pool keeps every state there anyway)."""
        if self.pool_size or self.config.resources.max_restarts == 0:
            return
        # Not waited for: the actor takes the snapshot before its next call, and that call's
        # answer confirms it (until then a restart uses the previous one and a longer
        # journal). Late participants are still busy and skip this round's snapshot.
        for i in range(len(self.specs)):
            if i not in self.late:
                call = _Call(i, "get_state", ())
                _, state = self._send(call)
                self.snapshot[i] = (state, len(self.journal[i]))

    def save(self, directory: Path) -> dict[str, dict]:
        """Each participant (or its pool actor) writes its state file into `directory`, which
        must be on storage the actors' nodes see; the driver only learns the checksums."""
        who = range(len(self.specs))
        paths = [str(directory / f"{name}.pt") for name in self.names]
        done = self._gather(self._submit(who, "save", args_for=lambda i: (paths[i],)), "checkpoint")
        return {self.names[i]: {"file": Path(paths[i]).name, **done[i].metrics} for i in who}

    def restore(self, directory: Path, entries: dict[str, dict]) -> list[dict]:
        def load_args(i: int) -> tuple:
            entry = entries[self.names[i]]
            return str(directory / entry["file"]), entry["sha256"]

        done = self._gather(self._submit(range(len(self.names)), "load", args_for=load_args), "resume")
        return [done[i].metrics for i in range(len(self.names))]

    def shutdown(self) -> None:
        for actor in [*getattr(self, "actors", []), getattr(self, "aggregator", None)]:
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
        self.actors, self.aggregator = [], None
        if getattr(self, "group", None) is not None and self.own_group:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        self.group = None


def _metrics_only(value: Any, name: str, phase: str) -> Any:
    """The driver takes only metrics from participants: scores go to the consensus actor,
    weights and private data never leave. An array here would be a protocol breach."""
    items = value.values() if isinstance(value, dict) else [value]
    for item in items:
        if not isinstance(item, (int, float, str, bool, type(None))):
            raise ParticipantError(
                name,
                phase,
                f"sent the driver a {type(item).__name__}; only "
                "metrics (numbers and strings) may reach the driver",
            )
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
