"""The `ray` backend: participants as Ray actors (one each, or a pool), the public data put
once, score refs gathered into a consensus actor and one consensus ref broadcast back."""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmd_ray.backends.actors import Aggregator, ProgressSink, describe_ray_error, metrics_only
from fedmd_ray.backends.resources import concurrency_window, init_ray, place
from fedmd_ray.backends.schedule import SPREAD, STACK, Schedule, Segment
from fedmd_ray.backends.shipping import uploaded, user_code
from fedmd_ray.backends.slots import ActorPool, Call, DedicatedActors, Shared
from fedmd_ray.backends.steps import Announce, Step, phase_of
from fedmd_ray.config import Config, ConfigError
from fedmd_ray.errors import ConsensusError, FedMDError, ParticipantError
from fedmd_ray.spec import ParticipantSpec, one_per_model
from fedmd_ray.tasks import Task

PROGRESS_POLL_SECONDS = 0.5
POOL_DEPTH = 32
"""Calls queued at once per pool actor. Submitting a phase's 10 000 calls at once made the
driver hold every one's task and return bookkeeping together (~40-60 KiB a call: 2.8 GiB at
10 000 participants); 32 keep each actor busy while the driver refills in batches."""


TRIM_AFTER_CALLS = 256


def trim_heap() -> None:
    """Give the driver's freed heap back to the system (glibc; elsewhere nothing). A phase of
    thousands of calls leaves Ray's per-call buffers freed but mapped; at 3000 participants
    trimming after each phase kept the driver at 571 MiB of private memory instead of 748."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        init_ray(config.resources.address)
        self.config = config
        self.specs = list(specs)
        self.names = [s.name for s in specs]
        self.events: list[dict] = []
        self.report = report
        n = len(specs)
        pooled = config.resources.actors is not None and config.resources.actors < n
        self.placement_plan = place(config, config.resources.actors if pooled else n, pooled)
        plan = self.placement_plan
        env, self.code = user_code(config)
        plan.runtime_env = uploaded(env)
        for spec in specs:
            spec.torch_threads = plan.threads
            spec.code = self.code
        self.tag = uuid.uuid4().hex[:6]
        # num_cpus=0: the participants may hold every CPU, and aggregation must still run.
        helper: dict[str, Any] = {"num_cpus": 0}
        if plan.runtime_env:
            helper["runtime_env"] = plan.runtime_env
        if plan.group is not None and not plan.own:
            helper["scheduling_strategy"] = plan.strategy(-1)
        self.aggregator = (
            ray.remote(Aggregator).options(name=f"fedmd-{self.tag}/consensus", **helper).remote()
        )
        self.sink = None
        if report is not None:
            self.sink = ray.remote(ProgressSink).options(name=f"fedmd-{self.tag}/progress", **helper).remote()
        # The public data enters the object store once; actors map it read-only. Private
        # data goes to its participant's actor (or, in a pool, travels with each call).
        shared = Shared(
            public=(ray.put(task.public_train.x), ray.put(task.public_train.y)),
            val=ray.put((task.public_val.x, task.public_val.y)),
            test=ray.put((task.private_test.x, task.private_test.y)),
            private=[ray.put((p.x, p.y)) for p in task.private_parts],
            sink=self.sink,
        )
        self._check_models(task)
        slots_class = ActorPool if pooled else DedicatedActors
        self.slots = slots_class(ray, self.specs, shared, plan, self.tag)
        self.restarts = [0] * plan.slots
        self.seconds: dict[str, dict[int, float]] = {}  # method -> participant -> last seconds
        self._scales: dict[str, tuple[int, float]] = {}  # method -> (calls timed, its seconds / transfer's)
        self.window = None if pooled else concurrency_window(config, ray.cluster_resources(), plan.threads)
        self.depth = POOL_DEPTH * plan.slots if pooled else None
        self.schedule = self._schedule(config, pooled)
        self.placement = {
            "num_cpus": plan.cpus,
            "num_gpus": plan.gpus,
            "torch_threads": plan.threads,
            "window": self.window,
            "schedule": self.schedule.policy if self.schedule else SPREAD,
            "strategy": config.resources.placement,
            "actors": plan.slots,
            "in_trial_group": plan.group is not None and not plan.own,
            "nodes": plan.nodes(),
        }
        ray.get(self.aggregator.__ray_ready__.remote())

    def _check_models(self, task: Task) -> None:
        """Each distinct model built and run once, on the consensus actor, before any
        participant's actor starts; a bad one refused in its own words."""
        try:
            self.ray.get(
                self.aggregator.check_models.remote(
                    one_per_model(self.specs), task.public_train.x[:2], task.num_classes
                )
            )
        except Exception as exc:
            self.shutdown()
            if isinstance(getattr(exc, "cause", None), FedMDError):
                raise exc.cause from None
            raise ConfigError(f"The models could not be checked: {describe_ray_error(exc)}") from None

    def _schedule(self, config: Config, pooled: bool) -> Schedule | None:
        """How calls share the cores (schedule.py), where that is this backend's to choose:
        CPU-only participants with actors of their own, more of them than cores, on one
        node, with neither threads nor concurrency pinned by the config, and no deadline."""
        r = config.resources
        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        if pooled or not self.window or r.num_gpus > 0 or len(alive) != 1:
            return None
        if r.deadline_s is not None:
            return None  # a stacked segment waits for everyone before it: a straggler would hold it
        if r.schedule == "auto" and (r.torch_threads or r.max_concurrent):
            return None
        cores = int(self.ray.cluster_resources().get("CPU", 1))
        return Schedule(r.schedule, cores) if cores > 1 else None

    # ------------------------------------------------------------ calls

    def _cost(self, method: str, i: int) -> float:
        """Participant i's seconds in its last `method` call; before it has made one, its
        transfer learning's seconds scaled by how the two compare for the others (in the first
        round, for everyone: the longest first is then the model that transferred longest)."""
        known = self.seconds.get(method, {})
        if i in known:
            return known[i]
        base = self.seconds.get("transfer", {})
        count, scale = self._scales.get(method, (-1, 1.0))
        if count != len(known):  # once per answer, not once per participant sorted
            both = [j for j in known if j in base]
            total = sum(base[j] for j in both)
            scale = sum(known[j] for j in both) / total if both and total > 0 else 1.0
            self._scales[method] = (len(known), scale)
        return base.get(i, 0.0) * scale

    def _plan(self, method: str, who: Sequence[int]) -> list[Segment]:
        """How `who`'s `method` calls share the cores: the schedule's segments, or one
        segment at the backend's window (a pool: its queue depth; 0: no limit)."""
        if self.schedule is None:
            return [Segment(SPREAD, list(who), self.window or self.depth or 0, 0)]
        # Probes picked by transfer learning's seconds pick the same participants for every
        # kind of call: a probe's whole chain then runs stacked at the start of the round,
        # not with the cores emptied for it mid-round.
        cost = self.seconds.get("transfer") or self.seconds.get(method, {})
        segments = self.schedule.plan(method, list(who), cost)
        news = self.schedule.news(method)
        if news:
            self.events.append({"participant": "*", "phase": method, "note": news})
        return segments

    def _submit(
        self,
        who: Sequence[int],
        method: str,
        *args: Any,
        args_for: Callable[[int], tuple] | None = None,
        segments: list[Segment] | None = None,
    ) -> dict[Any, Call]:
        """Call `method` on each participant in `who` with `args` (participant i with
        `args_for(i)` when given); returns metrics ref -> call. With a window (CPU runs with
        more actors than cores), at most that many run at once: more busy actors than cores
        only adds context switches and cache misses; the schedule may run some calls one at
        a time on every core instead."""
        calls: dict[Any, Call] = {}
        running: list = []
        segments = segments or self._plan(method, who)
        # Longest first (by last time's seconds): a window of workers finishes sooner when
        # the long calls do not come last. Results do not depend on the order. A pool keeps
        # index order, which alternates its actors (participant i is served by actor i % k).
        for n, segment in enumerate(segments):
            window = segment.window
            if n and segment.mode != segments[n - 1].mode:
                # Stacked calls run alone: their seconds are what they cost on all cores.
                self._settle(calls, running, 0)
                running = []
            order = sorted(segment.who, key=lambda i: -self._cost(method, i)) if self.window else segment.who
            # A pool's queue is refilled a quarter at a time; a window of cores call by call.
            low = window - max(1, window // 4) if self.depth else window - 1
            for i in order:
                if window and len(running) >= window:
                    running = self._settle(calls, running, low)
                call = Call(
                    i, method, args_for(i) if args_for else args, segment.threads or None, segment.mode
                )
                call.sent = time.perf_counter()
                metrics, call.payload = self.slots.send(call)
                calls[metrics] = call
                running.append(metrics)
        return calls

    def _settle(self, calls: dict[Any, Call], running: list, most: int) -> list:
        """Wait until at most `most` of `running` are still computing; the rest stay in
        `calls` for _gather, stamped with when their answers were seen. Goes through _wait,
        which keeps draining the progress sink: with 10 participants and a window of 2, the
        driver spends most of a phase here."""
        while len(running) > most:
            ready = set(self._wait(running, None, want=len(running) - most))
            now = time.perf_counter()
            for ref in ready:
                calls[ref].back = now
            running = [ref for ref in running if ref not in ready]
        return running

    def _restart(self, call: Call, phase: str, error: str) -> tuple[Any, Any]:
        """The actor under `call` died: start a new one, bring it back to where the dead one
        was, and resend `call` (see restarts.py for how that stays exact)."""
        slot = self.slots.slot(call.index)
        if self.slots.actors[slot] is not call.actor:
            # Another call queued on the same dead pool actor already replaced it.
            return self.slots.send(call, replay=True)
        limit = self.config.resources.max_restarts
        if self.restarts[slot] >= limit:
            raise ParticipantError(
                self.names[call.index],
                phase,
                f"{error} (restarted {self.restarts[slot]} times already; resources.max_restarts={limit})",
            )
        self.restarts[slot] += 1
        call.sent, call.back = time.perf_counter(), 0.0
        who = (
            f"pool actor {slot} (serving {self.names[call.index]})"
            if isinstance(self.slots, ActorPool)
            else "actor"
        )
        self.events.append(
            {"participant": self.names[call.index], "phase": phase, "note": f"restarted ({who} died)"}
        )
        return self.slots.bring_back(call, self.restarts[slot])

    def _wait(self, pending: list, timeout: float | None, want: int | None = None) -> list:
        """ray.wait for the next answer, then take every other answer already in, so that a
        phase of N calls costs O(N) waits, not N waits over N refs each; drains the
        progress sink while nobody answers."""
        stop = None if timeout is None else time.perf_counter() + timeout
        while True:
            step = timeout if self.sink is None else PROGRESS_POLL_SECONDS
            if stop is not None:
                step = min(step, stop - time.perf_counter())
            # With thousands of calls answering milliseconds apart, waking for each one would
            # scan the pending list once per answer (quadratic in N): wake for a 64th of them
            # (or at the poll timeout), then take whatever else is in.
            want = want or max(1, len(pending) // 64)
            ready, rest = self.ray.wait(
                pending, num_returns=want, timeout=None if step is None else max(0.0, step)
            )
            if ready and rest:
                more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            self._drain()
            if ready or self.sink is None or (stop is not None and time.perf_counter() >= stop):
                return ready

    def _drain(self) -> None:
        if self.sink is not None:
            for event in self.ray.get(self.sink.drain.remote()):
                self.report(event)

    def _gather(
        self, calls: dict[Any, Call], phase: str, need: int | None = None, deadline: float | None = None
    ) -> dict[int, Call]:
        """Wait for the calls' metrics: all of them, or `need` of them (after `deadline`
        seconds, when given). A participant that raised stops the run, named; one whose actor
        died is restarted and its call resent."""
        need = len(calls) if need is None else need
        pending = dict(calls)
        done: dict[int, Call] = {}
        start = time.perf_counter()
        while pending:
            # Before the deadline: wait for everyone. After it (or without one): stop at the
            # quorum, and until then keep waiting for whoever answers next.
            left = None if deadline is None else deadline - (time.perf_counter() - start)
            if len(done) >= need and (left is None or left <= 0):
                break
            ready = self._wait(list(pending), left if left is not None and left > 0 else None)
            if not ready:
                continue  # the deadline passed; go on once the quorum is in
            for ref in ready:
                self._take(ref, pending, done, phase)
        self._drain()
        if len(calls) >= TRIM_AFTER_CALLS:
            trim_heap()
        return done

    def _take(self, ref: Any, pending: dict[Any, Call], done: dict[int, Call], phase: str) -> None:
        """One answered call: its metrics, or its participant's failure (raised), or its
        actor's death (restarted, and the call resent)."""
        ray = self.ray
        call = pending.pop(ref)
        try:
            call.metrics = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            metrics, call.payload = self._restart(call, phase, describe_ray_error(exc))
            pending[metrics] = call
            return
        except Exception as exc:  # RayTaskError wraps the participant's own exception
            if isinstance(getattr(exc, "cause", None), FedMDError):
                # Ours already says what is wrong and how to fix it, as on the local backend.
                raise exc.cause from None
            raise ParticipantError(self.names[call.index], phase, describe_ray_error(exc)) from None
        metrics_only(call.metrics, self.names[call.index], phase)
        if isinstance(call.metrics, dict) and call.metrics.get("seconds") is not None:
            seconds = call.metrics["seconds"]
            self.seconds.setdefault(call.method, {})[call.index] = seconds
            if self.schedule is not None and call.mode:
                wall = (call.back or time.perf_counter()) - call.sent
                self.schedule.record(call.method, call.mode, call.index, seconds, wall)
        self.slots.answered(call)
        done[call.index] = call
        if self.report is not None:
            self.report({"kind": "done", "participant": self.names[call.index], "phase": phase})

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
        return self._each("upper_bound", "upper_bound", None, x, y)

    def logits(self, who: Sequence[int], indices: np.ndarray, round_: int) -> tuple[list, list, list]:
        """(answered, late, score refs): waits for everyone, or with resources.quorum and
        deadline_s, for those that answer in time."""
        r = self.config.resources
        need = len(who) if r.quorum >= 1 else max(1, math.ceil(r.quorum * len(who)))
        calls = self._submit(who, "logits", *self._call_args("logits", (indices, round_)))
        done = self._gather(calls, "communicate", need, r.deadline_s)
        answered = [i for i in who if i in done]
        late = [i for i in who if i not in done]
        return answered, late, [done[i].payload for i in answered]

    def aggregate(self, scores: list, names: list[str], plan: dict):
        status_ref, consensus_ref = self.aggregator.aggregate.options(num_returns=2).remote(
            {**plan, "code": self.code}, names, scores
        )
        try:
            status = self.ray.get(status_ref)
        except Exception as exc:  # the aggregator actor itself failed
            raise ParticipantError("consensus", "aggregate", describe_ray_error(exc)) from None
        if "consensus_error" in status:
            raise ConsensusError(status["consensus_error"])
        if "participant" in status:
            raise ParticipantError(status["participant"], status["phase"], status["error"])
        return consensus_ref

    def digest(self, who: Sequence[int], consensus, indices: np.ndarray, round_: int) -> list[dict]:
        return self._each("digest", "digest", who, *self._call_args("digest", (consensus, indices, round_)))

    def revisit(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("revisit", "revisit", who, round_)

    def evaluate(self, who: Sequence[int], round_: int) -> list[dict]:
        return self._each("evaluate", "evaluate", who, round_)

    def steps(
        self, steps: Sequence[Step], announce: Announce, ahead: bool = False
    ) -> tuple[list[Any], list[float]]:
        """Run `steps` (method, who, args): (each step's results, each step's wall seconds).

        A participant's steps depend on nobody else's, so each participant's next call goes
        out as soon as its last one answers: the cores stay busy across what would be phase
        barriers, where the sequential way idles behind the slowest participant. A step's
        wall seconds then run from the previous step's last answer to its own. A pool runs
        step by step (its queue, not a window, keeps its actors busy), and not `ahead`.

        A `logits` step's result is what `logits` returns. With `ahead`, the last step is the
        next round's communicate (steps.py): if one of its calls fails, its result is None."""
        if ahead and not self.runs_ahead:
            raise ValueError("this backend does not run the next round's communicate ahead")
        planned = [(m, list(who), self._call_args(m, args), self._plan(m, who)) for m, who, args in steps]
        if self.depth is None and len(planned) > 1:
            everyone = sorted({i for _, who, *_ in planned for i in who})
            announce([phase_of(method) for method, *_ in planned], everyone)
            return self._chain(planned, ahead)
        results, walls = [], []
        for method, who, args, segments in planned:
            announce([phase_of(method)], who)
            start = time.perf_counter()
            done = self._gather(self._submit(who, method, *args, segments=segments), phase_of(method))
            results.append(self._result(method, who, done))
            walls.append(time.perf_counter() - start)
        return results, walls

    @property
    def runs_ahead(self) -> bool:
        """Whether `steps` may take the next round's communicate (actors of their own: a
        pool runs step by step, and its queue leaves no core idle to fill)."""
        return self.depth is None

    @staticmethod
    def _result(method: str, who: list[int], done: dict[int, Call]) -> Any:
        if method == "logits":
            return who, [], [done[i].payload for i in who]
        return [done[i].metrics for i in who]

    def _call_args(self, method: str, args: tuple) -> tuple:
        """A step's arguments as its calls take them: the public indices put once."""
        if method == "digest":
            consensus, indices, round_ = args
            return consensus, self.ray.put(indices), round_
        if method == "logits":
            indices, round_ = args
            return self.ray.put(indices), round_
        return args

    def _chain(self, planned: list, ahead: bool = False) -> tuple[list[Any], list[float]]:
        """Each participant's steps in order, each call run the way its step's segments say:
        spread calls at most a window at once (0: no limit), a stacked call (a schedule
        probe) alone on the cores: at the start, or at the end when it came ready while
        spread calls ran. Stacked calls first, then the participant with the most work left
        (by last seconds). With `ahead`, a failure in the last step is kept, not
        raised: that step's result is None."""
        chain: dict[int, list[int]] = {}  # participant -> its steps, in order
        way: dict[tuple[int, int], Segment] = {}  # (step, participant) -> how its call runs
        for k, (_, who, _, segments) in enumerate(planned):
            for segment in segments:
                for i in segment.who:
                    way[k, i] = segment
            for i in who:
                chain.setdefault(i, []).append(k)

        def entry(i: int, pos: int) -> tuple:
            k = chain[i][pos]
            work = sum(self._cost(planned[j][0], i) for j in chain[i][pos:])
            return (way[k, i].mode != STACK, -work, i, pos)

        ready = [entry(i, 0) for i in chain]
        heapq.heapify(ready)
        pending: dict[Any, Call] = {}
        done: list[dict[int, Call]] = [{} for _ in planned]
        last = len(planned) - 1
        failed = False  # a call of the step run ahead
        start = time.perf_counter()
        ends = [start] * len(planned)
        later: list[tuple] = []  # stacked calls that came ready while spread ones ran
        while ready or pending or later:
            if not ready and not pending:
                ready, later = later, []
                heapq.heapify(ready)
            while ready:
                spread, _, i, pos = ready[0]
                segment = way[chain[i][pos], i]
                alone = any(c.mode == STACK for c in pending.values())
                if not spread and pending and not alone:
                    # Emptying the cores for it now would idle one behind the longest call
                    # running: it runs at the end, once nothing else is left.
                    later.append(heapq.heappop(ready))
                    continue
                full = segment.window and len(pending) >= segment.window
                if (not spread and pending) or (spread and (alone or full)):
                    break  # a stacked call waits for the one before it, spread ones for a slot
                heapq.heappop(ready)
                method, _, args, _ = planned[chain[i][pos]]
                call = Call(i, method, args, segment.threads or None, segment.mode)
                call.step, call.sent = pos, time.perf_counter()
                metrics, call.payload = self.slots.send(call)
                pending[metrics] = call
            if not pending:
                continue
            answers = self._wait(list(pending), None, want=1)
            now = time.perf_counter()
            for ref in answers:
                call = pending[ref]
                call.back = now
                k = chain[call.index][call.step]
                try:
                    self._take(ref, pending, done[k], phase_of(planned[k][0]))
                except FedMDError:
                    if not (ahead and k == last):
                        raise
                    failed = True  # raised again when the caller runs it in its own round
                    continue
                if call.index not in done[k]:
                    continue  # its actor died; resent, still pending
                ends[k] = now
                if call.step + 1 < len(chain[call.index]):
                    heapq.heappush(ready, entry(call.index, call.step + 1))
        self._drain()
        if sum(len(d) for d in done) >= TRIM_AFTER_CALLS:
            trim_heap()
        walls = [max(0.0, end - max([start, *ends[:k]])) for k, end in enumerate(ends)]
        results = [
            None if failed and k == last else self._result(method, who, done[k])
            for k, (method, who, _, _) in enumerate(planned)
        ]
        return results, walls

    def end_round(self, round_: int, busy: Sequence[int] = ()) -> None:
        """Keep each participant's state where a restart can find it. Participants in `busy`
        (late ones, still computing) skip this round's snapshot."""
        if self.config.resources.max_restarts == 0:
            return
        self.slots.snapshot([i for i in range(len(self.specs)) if i not in set(busy)])

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
        slots = getattr(self, "slots", None)
        for actor in [
            *(slots.actors if slots else []),
            getattr(self, "aggregator", None),
            getattr(self, "sink", None),
        ]:
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
        self.slots, self.aggregator, self.sink = None, None, None
        if getattr(self, "placement_plan", None) is not None:
            self.placement_plan.release()
