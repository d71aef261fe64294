"""The `ray` backend: participants as Ray actors (one each, or a pool), the public data put
once, score refs gathered into a consensus actor and one consensus ref broadcast back.
Every participant call goes through the dispatcher (dispatch.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedmd_ray.backends import mps
from fedmd_ray.backends.actors import Aggregator, ProgressSink, describe_ray_error, fetch
from fedmd_ray.backends.dispatch import Dispatcher, Outcome, Step
from fedmd_ray.backends.resources import beside_driver, concurrency_window, init_ray, place, shares_gpus
from fedmd_ray.backends.shipping import upload, user_code
from fedmd_ray.backends.slots import ActorPool, DedicatedActors, Shared
from fedmd_ray.backends.warm import KEPT, key
from fedmd_ray.config import Config
from fedmd_ray.errors import ConsensusError, FedMDError, ParticipantError, StateLost
from fedmd_ray.phases import Phase
from fedmd_ray.plans import RoundPlan
from fedmd_ray.progress import phase_event
from fedmd_ray.protocol import ConsensusPlan, Event, Scores, Updates
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.storage import Storage
from fedmd_ray.tasks import Task

HELPERS = {"consensus": Aggregator, "progress": ProgressSink}


class RayBackend:
    """Participants as Ray actors: one stateful actor each, or (resources.actors) a pool of
    actors that participants take turns on, their state kept in the object store."""

    name = "ray"

    def __init__(
        self,
        config: Config,
        task: Task,
        specs: Sequence[ParticipantSpec],
        report: Callable[[dict], None] | None = None,
    ):
        import ray

        self.ray = ray
        self.slots = self.aggregator = self.sink = self.plan = self.shipment = self.dispatch = None
        self.mps: dict[str, dict] | None = None
        """MPS on each GPU node (resources.mps="auto"), as mps.start found it."""
        self.reuse = False
        try:
            self._start(config, task, specs, report)
        except BaseException:
            self.shutdown()  # nothing started may outlive a refusal
            raise

    def _start(
        self,
        config: Config,
        task: Task,
        specs: Sequence[ParticipantSpec],
        report: Callable[[dict], None] | None,
    ) -> None:
        ray = self.ray
        self.shipment = user_code(config)
        started = init_ray(config.resources.address, runtime_env=self.shipment.env)
        self.config = config
        self.specs = list(specs)
        self.names = [s.name for s in specs]
        self.report = report
        n = len(specs)
        r = config.resources
        pooled = r.actors is not None and r.actors < n
        # Actors kept from an earlier run (warm.py) are taken by one with the same resources
        # and code; every other run needs their CPUs and GPUs back first.
        # Kept actors would outlive the MPS daemon this run stops at its end.
        self.reuse = (
            r.reuse_actors and not pooled and r.placement is None and not r.per_model and r.mps == "off"
        )
        if not self.reuse:
            KEPT.release(ray)
        # A Ray this run started on this machine (no address, no Ray job's RAY_ADDRESS) has no
        # autoscaler: what it lacks now, it lacks.
        fixed = started and r.address is None and not os.environ.get("RAY_ADDRESS")
        self.plan = plan = place(config, r.actors if pooled else n, pooled, fixed)
        self.reuse = self.reuse and plan.group is None  # not inside a Tune trial's group
        if r.mps == "auto" and shares_gpus(plan):
            self.mps = mps.start(ray)  # before any actor touches CUDA
        self.code = self.shipment.code
        # A Ray this run started or joined has the code in its job's runtime_env; one that was
        # running already (a notebook, a Tune trial) gets it per actor.
        plan.runtime_env = None if started else upload(self.shipment.env)
        for spec in specs:
            spec.torch_threads = plan.threads
            spec.code = self.code
        self.tag = uuid.uuid4().hex[:6]
        # num_cpus=0: the participants may hold every CPU, and aggregation must still run.
        helper: dict[str, Any] = {"num_cpus": 0}
        if plan.runtime_env:
            helper["runtime_env"] = plan.runtime_env
        if plan.in_trial:
            helper["scheduling_strategy"] = plan.strategy(-1)
        else:
            # Beside the driver: a worker node lost takes participants with it (restarted
            # elsewhere), never the consensus of the round or the progress display.
            helper["scheduling_strategy"] = beside_driver(ray)
        self.helper = helper
        if self.reuse:
            KEPT.release(
                ray, keep={key("participant", plan.actor_options(0)), *(key(k, helper) for k in HELPERS)}
            )
        else:
            KEPT.release(ray)
        self.aggregator = self._helper("consensus", helper)
        self.sink = self._helper("progress", helper) if report is not None else None
        # The public data enters the object store once; actors map it read-only. Private
        # data goes to its participant's actor (or, in a pool, travels with each call).
        shared = Shared(
            public=(ray.put(task.public_train.x), ray.put(task.public_train.y)),
            val=ray.put((task.public_val.x, task.public_val.y)),
            test=ray.put((task.private_test.x, task.private_test.y)),
            private=[ray.put((p.x, p.y)) for p in task.private_parts],
            sink=self.sink,
        )
        window = None if pooled else concurrency_window(config, ray.cluster_resources(), plan.threads)
        if pooled:
            self.slots = ActorPool(ray, self.specs, shared, plan, self.tag, together=r.group)
        else:
            turns = window is not None and window < n  # actors wait for a core between calls
            self.slots = DedicatedActors(ray, self.specs, shared, plan, self.tag, self.reuse, give_back=turns)
        self.dispatch = Dispatcher(
            ray, self.slots, self.names, window, r.max_restarts, self.sink, report, self.shipment.unship
        )
        # The next round's scores go out as each participant's last step of this round, where
        # everyone is waited for (who answers in time must otherwise be seen in its own
        # round) and actors are their participants' own (a pool's queue leaves no core idle).
        self.runs_ahead = not pooled and r.quorum >= 1 and r.deadline_s is None
        self._ahead: tuple[int, Scores | None, FedMDError | None] | None = None
        self.threads = plan.threads
        self.placement = {
            "num_cpus": plan.cpus,
            "num_gpus": plan.gpus,
            "torch_threads": plan.threads,
            "window": window or plan.slots,  # calls computing at once (a pool actor's one by one)
            "strategy": r.placement,
            "actors": plan.slots,
            "in_trial_group": plan.in_trial,
            "nodes": plan.nodes(),
        }
        if r.mps == "auto":
            self.placement["mps"] = (
                self.mps if self.mps is not None else "not started: no two actors share a GPU"
            )
        if plan.each:
            self.placement["per_participant"] = [
                {"participant": name, "model": spec.model, "num_cpus": cpus, "num_gpus": gpus}
                for name, spec, (cpus, gpus) in zip(self.names, self.specs, plan.each)
            ]

    # ------------------------------------------------------------ the FedMD steps

    def _announce(self, phases: list[Phase], who: Sequence[int], round_: int = 0) -> None:
        if self.report is not None:
            names = [self.names[i] for i in who]
            self.report(phase_event(phases, round_, self.config.train.rounds, names))

    def _everyone(self, phase: Phase, *args: Any) -> list[dict]:
        who = list(range(len(self.names)))
        self._announce([phase], who)
        done = self.dispatch.run([Step(phase, who, args)]).done[0]
        return [done[i].metrics for i in who]

    def describe(self) -> list[dict]:
        return self._everyone(Phase.SETUP)

    def transfer(self) -> list[dict]:
        return self._everyone(Phase.TRANSFER)

    def upper_bound(self, pooled_x: np.ndarray, pooled_y: np.ndarray) -> list[dict]:
        return self._everyone(Phase.UPPER_BOUND, self.ray.put(pooled_x), self.ray.put(pooled_y))

    def communicate(self, plan: RoundPlan) -> Scores:
        """The chosen participants' scores (object refs): everyone's, or with
        resources.quorum and deadline_s, those that answered in time."""
        if self._ahead is not None and self._ahead[0] == plan.round:
            _, scores, failure = self._ahead
            self._ahead = None
            if failure is not None:
                raise failure
            return scores
        r = self.config.resources
        who = plan.chosen
        need = len(who) if r.quorum >= 1 else max(1, math.ceil(r.quorum * len(who)))
        self._announce([Phase.COMMUNICATE], who, plan.round)
        step = Step(Phase.COMMUNICATE, who, (self.ray.put(plan.indices), plan.round))
        outcome = self.dispatch.run([step], need=need, deadline_s=r.deadline_s)
        return _scores(plan, outcome, 0)

    def aggregate(self, scores: Scores, plan: ConsensusPlan) -> Any:
        names = [self.names[i] for i in scores.answered]
        # The refs go with the call: the scores' last reader is the consensus actor.
        refs, scores.payloads = scores.payloads, []
        status_ref, consensus_ref = self.aggregator.aggregate.options(num_returns=2).remote(
            dataclasses.replace(plan, code=self.code), names, refs
        )
        del refs
        try:
            status = self.ray.get(status_ref)
        except Exception as exc:  # the aggregator actor itself failed
            raise ParticipantError("consensus", Phase.AGGREGATE, describe_ray_error(exc)) from None
        if status.error is not None:
            if status.lost:
                raise StateLost(status.participant, f"its scores for round {scores.plan.round}")
            if status.participant is None:
                raise ConsensusError(status.error)
            raise ParticipantError(status.participant, Phase.COMMUNICATE, status.error)
        return consensus_ref

    def update(
        self, scores: Scores, consensus: Any, evaluate: Sequence[int], upcoming: RoundPlan | None
    ) -> Updates:
        """Each participant's digest, revisit and evaluation as one chain (nobody waits at a
        phase's end for the slowest model), and where it may, its scores for `upcoming`."""
        plan, answered = scores.plan, scores.answered
        steps = [
            Step(Phase.DIGEST, answered, (consensus, self.ray.put(plan.indices), plan.round)),
            Step(Phase.REVISIT, answered, (plan.round,)),
            Step(Phase.EVALUATE, list(evaluate), (plan.round,)),
        ]
        ahead = upcoming is not None and self.runs_ahead
        if ahead:
            indices = self.ray.put(upcoming.indices)
            steps.append(Step(Phase.COMMUNICATE, upcoming.chosen, (indices, upcoming.round)))
        everyone = sorted({i for step in steps for i in step.who})
        self._announce([step.phase for step in steps], everyone, plan.round)
        outcome = self.dispatch.run(steps, spare_last=ahead)
        if ahead:
            scores_ahead = None if outcome.failure else _scores(upcoming, outcome, 3)
            self._ahead = (upcoming.round, scores_ahead, outcome.failure)
        results = [[outcome.done[k][i].metrics for i in step.who] for k, step in enumerate(steps[:3])]
        return Updates(*results, walls=dict(zip((s.phase for s in steps[:3]), outcome.walls)))

    def end_round(self, round_: int, busy: Sequence[int] = ()) -> list[Event]:
        """Keep each participant's state where a restart can find it. Participants in `busy`
        (late ones, still computing) skip this round's snapshot."""
        if self.config.resources.max_restarts > 0:
            skip = set(busy)
            self.slots.snapshot([i for i in range(len(self.specs)) if i not in skip])
        events, self.dispatch.events = self.dispatch.events, []
        return events

    def _writers(self, storage: Storage) -> bool:
        """Whether the actors write the states into `storage` themselves: on a URI, or on a
        local path while every actor is on this (the driver's) node. A local path on a
        cluster may be a disk of each node's own, so there the states travel through the
        object store and this process writes them: a checkpoint is always where --resume
        will read it."""
        if not storage.local:
            return True
        here = self.ray.get_runtime_context().get_node_id()
        nodes = self.ray.get([actor.node.remote() for actor in self.slots.actors])
        return all(node == here for node in nodes)

    def save(self, storage: Storage, folder: str) -> dict[str, dict]:
        """Each participant's state into `folder` of `storage` (see _writers: by its actor,
        or handed to this process); the driver learns the checksums."""
        who = list(range(len(self.names)))
        files = [f"{name}.pt" for name in self.names]
        actors_write = self._writers(storage)
        if actors_write:
            step = Step(Phase.CHECKPOINT, who, lambda i: (storage.location(folder, files[i]),))
        else:
            step = Step(Phase.CHECKPOINT, who, (None,))
        done = self.dispatch.run([step]).done[0]
        if not actors_write:
            for i in who:  # one state in this process at a time
                state = fetch(self.ray, done[i].payload, self.names[i], f"its state for checkpoint {folder}")
                storage.write_bytes(f"{folder}/{files[i]}", state)
        return {
            self.names[i]: {
                "file": files[i],
                "sha256": done[i].metrics["sha256"],
                "bytes": done[i].metrics["bytes"],
                "written_by": "actor" if actors_write else "driver",
            }
            for i in who
        }

    def restore(self, storage: Storage, folder: str, entries: dict[str, dict]) -> None:
        """Each participant's state from `folder` of `storage`: read by its actor, or (a
        local path on a cluster) read here and handed over."""
        readers = self._writers(storage)

        def load_args(i: int) -> tuple:
            entry = entries[self.names[i]]
            location = storage.location(folder, entry["file"])
            if readers:
                return location, entry["sha256"]
            return location, entry["sha256"], self.ray.put(storage.read_bytes(folder, entry["file"]))

        who = list(range(len(self.names)))
        self._announce([Phase.RESUME], who)
        self.dispatch.run([Step(Phase.RESUME, who, load_args)])

    def _helper(self, kind: str, options: dict[str, Any]) -> Any:
        """The consensus actor or the progress sink: a kept one (warm.py), or a new one."""
        kept = KEPT.take(self.ray, kind, options) if self.reuse else None
        if kept is not None:
            if kind == "progress":
                kept.drain.remote()  # whatever an earlier run left unread
            return kept
        cls = HELPERS[kind]
        return self.ray.remote(cls).options(name=f"fedmd-{self.tag}/{kind}", **options).remote()

    def shutdown(self) -> None:
        if self.slots is not None:
            self.slots.stop()
        if self.dispatch is not None:
            self.dispatch.settle()  # after the actors stopped: what they left unread
        for kind, actor in (("consensus", self.aggregator), ("progress", self.sink)):
            if actor is None:
                continue
            if self.reuse:
                KEPT.keep(self.ray, kind, self.helper, actor)
            else:
                self.ray.kill(actor, no_restart=True)
        self.slots, self.aggregator, self.sink = None, None, None
        # Trials of one Tune search run side by side: a daemon one trial started may be
        # serving another's actors when it ends, so trials leave it running.
        if self.mps and not self.plan.in_trial:  # self.mps is set only once placed
            mps.stop(self.ray, self.mps)  # after the actors, its clients
        self.mps = None
        if self.plan is not None:
            self.plan.release()
        if self.shipment is not None:
            self.shipment.remove()  # Ray holds its own copy of the code


def _scores(plan: RoundPlan, outcome: Outcome, k: int) -> Scores:
    """Step k of `outcome`, a communicate for `plan`, as the round's Scores."""
    done = outcome.done[k]
    answered = [i for i in plan.chosen if i in done]
    late = [i for i in plan.chosen if i not in done]
    return Scores(
        plan,
        answered,
        late,
        [done[i].payload for i in answered],
        [done[i].metrics for i in answered],
        outcome.walls[k],
    )
