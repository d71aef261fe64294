"""The one engine every participant call on Ray goes through: transfer learning, a round's
steps, checkpoints, restores, descriptions.

Work comes as steps (a phase, the participants that take it, their arguments). Each
participant's steps form a chain: its next call goes out as soon as its last one answered,
since no participant needs another's step. How many calls run at once is said in one
place, by the slots and the backend's window:

- a slot (an actor) holds at most `slots.room` calls (its own actor: 1, a pool actor: a
  queue deep enough to stay busy while the driver refills it);
- at most `window` calls run at once in all (CPU runs with more participants than cores;
  None: as many as the slots hold).

Among the calls that may go out, the participant with the most work left goes first (by
the seconds its calls took last time), so a long call does not start last and leave a core
idle at the end. Neither the order nor the window changes a number: every call seeds itself
and runs on its participant's threads.

A call whose actor died is resent to a new one (slots.bring_back, restarts.py), at most
`max_restarts` times per actor; a participant that raised stops the run with its name.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmd_ray.backends.actors import describe_ray_error, lost, metrics_only
from fedmd_ray.backends.slots import Call
from fedmd_ray.errors import ConfigError, Failed, FedMDError, ParticipantError, StateLost
from fedmd_ray.heap import give_back_freed_memory
from fedmd_ray.phases import Phase
from fedmd_ray.protocol import Event

PROGRESS_POLL_SECONDS = 0.5
TRIM_AFTER_CALLS = 256


@dataclass
class Step:
    """One phase for some participants: `args` for everyone, or `args(i)` for participant i."""

    phase: Phase
    who: list[int]
    args: tuple | Callable[[int], tuple] = ()

    def args_of(self, i: int) -> tuple:
        return self.args(i) if callable(self.args) else self.args


@dataclass
class Outcome:
    """What a run of steps gave: per step, the answered calls by participant; per step, its
    wall seconds (from the previous step's last answer to its own); the participants of a
    quorum step that did not answer in time; a failure kept rather than raised."""

    done: list[dict[int, Call]]
    walls: list[float]
    late: list[int] = field(default_factory=list)
    failure: FedMDError | None = None


class Costs:
    """Each participant's last seconds per phase: the order calls go out in."""

    def __init__(self) -> None:
        self.seconds: dict[Phase, dict[int, float]] = {}
        self._scales: dict[Phase, tuple[int, float]] = {}

    def record(self, phase: Phase, index: int, seconds: float) -> None:
        self.seconds.setdefault(phase, {})[index] = seconds

    def of(self, phase: Phase, i: int) -> float:
        """Participant i's seconds in its last `phase` call; before it has made one, its
        transfer learning's seconds scaled by how the two compare for the others (in the
        first round, for everyone: the model that transferred longest goes first)."""
        known = self.seconds.get(phase, {})
        if i in known:
            return known[i]
        base = self.seconds.get(Phase.TRANSFER, {})
        count, scale = self._scales.get(phase, (-1, 1.0))
        if count != len(known):  # recomputed once per answer, not once per participant sorted
            both = [j for j in known if j in base]
            total = sum(base[j] for j in both)
            scale = sum(known[j] for j in both) / total if both and total > 0 else 1.0
            self._scales[phase] = (len(known), scale)
        return base.get(i, 0.0) * scale


class Dispatcher:
    def __init__(
        self,
        ray: Any,
        slots: Any,
        names: list[str],
        window: int | None,
        max_restarts: int,
        sink: Any = None,
        report: Callable[[dict], None] | None = None,
        unship: Callable[[str], str] | None = None,
    ):
        self.ray, self.slots, self.names, self.window = ray, slots, names, window
        self.max_restarts, self.sink, self.report = max_restarts, sink, report
        self.unship = unship
        """Rewrites the paths of Ray's copies of the user's code into the user's own."""
        self.costs = Costs()
        self.restarts: dict[int, int] = {}
        self.events: list[Event] = []
        self._drained = 0.0
        self.unsettled: list[Call] = []
        """Calls still out when a failure stopped a run of steps: `settle` reads them."""
        self.late: list[Call] = []
        """Calls a quorum went on without (late participants' scores), until they answer."""

    def run(
        self,
        steps: Sequence[Step],
        need: int | None = None,
        deadline_s: float | None = None,
        spare_last: bool = False,
    ) -> Outcome:
        """Run `steps`, each participant's in order. With `need` (one step only), stop once
        that many have answered and, with `deadline_s`, the deadline has passed: the rest
        are late. With `spare_last`, a participant failing in the last step ends only its
        own chain, and the failure comes back in the outcome instead of being raised."""
        if need is not None and len(steps) != 1:
            raise ValueError("a quorum applies to a run of one step")
        chains: dict[int, list[int]] = {}
        for k, step in enumerate(steps):
            for i in step.who:
                chains.setdefault(i, []).append(k)
        done: list[dict[int, Call]] = [{} for _ in steps]
        outcome = Outcome(done, [0.0] * len(steps))
        start = time.perf_counter()
        ends = [start] * len(steps)

        def unit(i: int, k: int) -> Any:  # a step whose arguments differ by participant: one each
            return ("own", i) if callable(steps[k].args) else self.slots.unit(i)

        self._check_late()
        queue = _Queue(self.slots, self.window, unit, steps)
        for i in chains:
            queue.push(self._entry(steps, chains, i, 0), chains[i][0])
        pending: dict[Any, Call] = {}  # metrics ref -> the call
        total = sum(len(c) for c in chains.values())
        try:
            while queue or pending:
                for bundle in queue.take():
                    k = chains[bundle[0][0]][bundle[0][1]]
                    calls = [Call(i, steps[k].phase, steps[k].args_of(i), pos) for i, pos in bundle]
                    self._sent(calls, self.slots.send(calls), pending)
                if need is not None and self._quorum(done[0], need, deadline_s, start):
                    break
                timeout = None  # after the deadline: whoever answers next
                if need is not None and deadline_s is not None:
                    left = deadline_s - (time.perf_counter() - start)
                    timeout = left if left > 0 else None
                for ref in self._wait(list(pending), timeout):
                    call = pending.pop(ref, None)
                    if call is None:
                        continue  # its bundle was resent after its actor died: a new ref is out
                    k = chains[call.index][call.pos]
                    try:
                        answered = self._take(ref, call, pending)
                    except FedMDError as exc:
                        if not (spare_last and k == len(steps) - 1):
                            raise
                        outcome.failure = outcome.failure or exc
                        queue.free(call)
                        continue
                    if not answered:
                        continue  # its actor died: resent, still pending
                    queue.free(call)
                    done[k][call.index] = call
                    ends[k] = time.perf_counter()
                    if call.pos + 1 < len(chains[call.index]):
                        nxt = call.pos + 1
                        queue.push(self._entry(steps, chains, call.index, nxt), chains[call.index][nxt])
        except BaseException:
            self.unsettled += pending.values()
            raise
        self._drain(force=True)
        if need is not None:
            outcome.late = [i for i in steps[0].who if i not in done[0]]
            self.late += pending.values()
        self._check_late()
        outcome.walls = [max(0.0, end - max([start, *ends[:k]])) for k, end in enumerate(ends)]
        if total >= TRIM_AFTER_CALLS:
            # A phase of thousands of calls leaves Ray's per-call buffers freed but mapped: at
            # 3000 participants, giving them back kept the driver at 571 MiB instead of 748.
            give_back_freed_memory()
        return outcome

    @staticmethod
    def _sent(calls: list[Call], refs: list[tuple[Any, Any]], pending: dict[Any, Call]) -> None:
        """Calls just sent (or resent) as one bundle: their refs are what is waited on."""
        bundle = _Bundle(calls)
        for call, (metrics, payload) in zip(calls, refs):
            if call.ref is not None:
                pending.pop(call.ref, None)
            call.ref, call.payload, call.bundle = metrics, payload, bundle
            pending[metrics] = call

    def _entry(self, steps: Sequence[Step], chains: dict[int, list[int]], i: int, pos: int) -> tuple:
        work = sum(self.costs.of(steps[k].phase, i) for k in chains[i][pos:])
        return (-work, i, pos)

    @staticmethod
    def _quorum(done: dict, need: int, deadline_s: float | None, start: float) -> bool:
        """Before the deadline everyone is waited for; after it (or without one) the quorum."""
        if len(done) < need:
            return False
        return deadline_s is None or time.perf_counter() - start >= deadline_s

    def _take(self, ref: Any, call: Call, pending: dict) -> bool:
        """One answered call: True with its metrics kept; False if its actor died (restarted,
        its bundle resent); raised: the participant's own failure."""
        ray = self.ray
        name = self.names[call.index]
        try:
            call.metrics = ray.get(ref)
        except ray.exceptions.RuntimeEnvSetupError as exc:
            raise ConfigError(
                f"Participant '{name}' could not set up its runtime_env: {_first_line(exc)}"
            ) from None
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as exc:
            # Ray's memory monitor ends the actor's process as a kill would: restarted, with
            # the others' calls freeing memory meanwhile (max_restarts bounds a model that
            # never fits).
            if _env_failed(exc):
                raise ConfigError(
                    f"Participant '{name}' could not set up its runtime_env: {_first_line(exc)}"
                ) from None
            calls = call.bundle.calls
            memory = isinstance(exc, ray.exceptions.OutOfMemoryError)
            self._sent(calls, self._restart(call, calls, describe_ray_error(exc), memory), pending)
            return False
        except Exception as exc:  # RayTaskError wraps the participant's own exception
            self._read_quietly(call)
            if lost(exc):
                raise StateLost(name, f"the answer of its {call.phase} call") from None
            raise self._failure(call, exc) from None
        if isinstance(call.metrics, Failed):  # one member of a pool's bundle
            raise self._failure(call, call.metrics)
        metrics_only(call.metrics, name, call.phase)
        if call.metrics.get("seconds") is not None:
            self.costs.record(call.phase, call.index, call.metrics["seconds"])
        self.slots.answered(call)
        if self.report is not None:
            self.report({"kind": "done", "participant": name, "phase": call.phase})
        return True

    def _failure(self, call: Call, error: Exception | Failed) -> FedMDError:
        """What a call that raised says: ours already says what is wrong and how to fix it,
        as on the local backend; anything else is named by its participant and phase. Either
        names the user's files, not Ray's copies of them."""
        cause = error.error if isinstance(error, Failed) else getattr(error, "cause", None)
        if isinstance(cause, FedMDError):
            return self._unshipped(cause)
        if isinstance(error, Failed):
            failure = ParticipantError(self.names[call.index], call.phase, error.text, error.trace)
        else:
            # A task error's text is the participant's own traceback, as Ray carried it back.
            trace = _plain(str(error)) if cause is not None else None
            failure = ParticipantError(self.names[call.index], call.phase, describe_ray_error(error), trace)
        return self._unshipped(failure)

    def _unshipped(self, error: FedMDError) -> FedMDError:
        if self.unship is not None:
            error.args = tuple(self.unship(a) if isinstance(a, str) else a for a in error.args)
            if isinstance(error, ParticipantError) and error.trace:
                error.trace = self.unship(error.trace)
        return error

    def _check_late(self) -> None:
        """Late calls that answered since: one that raised stops the run by its
        participant's name, as it would have in time (Ray would otherwise print its error
        when the object is freed, and nobody else would say it). One whose actor died is
        left to that participant's next call, which brings the actor back (restarts.py).
        A participant's next call runs after its late one on the same actor, so a failure is
        seen by the end of the run of steps it takes part in next."""
        if not self.late:
            return
        out = {call.ref: call for call in self.late}
        ready, _ = self.ray.wait(list(out), num_returns=len(out), timeout=0)
        try:
            for ref in ready:
                call = out.pop(ref)
                try:
                    metrics = self.ray.get(ref)
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.OutOfMemoryError):
                    self._read_quietly(call)
                    continue
                except Exception as exc:
                    self._read_quietly(call)
                    raise self._failure(call, exc) from None
                if isinstance(metrics, Failed):
                    raise self._failure(call, metrics)
        finally:
            self.late = list(out.values())  # unread ones too, if one failed: `settle` reads them

    def settle(self, wait_s: float = 10.0) -> None:
        """After the actors were stopped: read the calls that were still out (a failure
        stopped the run, or a quorum went on without them). Each failed one (another
        participant failing in the same step, say) holds its error, and Ray prints every
        error nobody read, with the participant's whole traceback, when its object is
        freed: after the run said what failed in one line. A call cut short by its actor's
        end is not printed; one still computing on a kept actor (resources.reuse_actors) is
        waited for up to `wait_s`."""
        out = {call.ref: call for call in self.unsettled + self.late}
        self.unsettled, self.late = [], []
        if not out:
            return
        try:
            ready, _ = self.ray.wait(list(out), num_returns=len(out), timeout=wait_s)
        except Exception:  # noqa: BLE001 - Ray gone: nothing left to print; never mask the run's error
            return
        for ref in ready:
            try:
                self.ray.get(ref)
            except Exception:
                self._read_quietly(out[ref])

    def _read_quietly(self, call: Call) -> None:
        """Read a failed call's other answers (its scores, its bundle's states), which hold
        the same error."""
        for ref in call.other_answers():
            try:
                self.ray.get(ref, timeout=0)
            except Exception:
                pass

    def _restart(
        self, call: Call, calls: list[Call], error: str, memory: bool = False
    ) -> list[tuple[Any, Any]]:
        """The actor under `call` died: start a new one, bring it back to where the dead one
        was, and resend `calls` (`call`'s bundle; restarts.py says how that stays exact)."""
        slot = self.slots.slot(call.index)
        if self.slots.actors[slot] is not call.actor:
            # Another bundle queued on the same dead pool actor already replaced it.
            return self.slots.send(calls, replay=True)
        name = self.names[call.index]
        count = self.restarts.get(slot, 0)
        if count >= self.max_restarts:
            raise ParticipantError(
                name,
                call.phase,
                f"{error} (restarted {count} times already; resources.max_restarts={self.max_restarts})",
            )
        self.restarts[slot] = count + 1
        whose = f"pool actor {slot} (serving {name})" if len(self.slots.actors) < len(self.names) else "actor"
        why = "ended by Ray's memory monitor: the node ran low on RAM" if memory else "died"
        self.events.append(Event(name, call.phase, f"restarted ({whose} {why})"))
        return self.slots.bring_back(calls, count + 1)

    def _wait(self, pending: list, timeout: float | None) -> list:
        """ray.wait for the next answer, then every other answer already in (a step of N
        calls costs O(N) waits, not N waits over N refs each); keeps the progress display
        fed while nobody answers."""
        stop = None if timeout is None else time.perf_counter() + timeout
        while True:
            step = timeout if self.sink is None else PROGRESS_POLL_SECONDS
            if stop is not None:
                step = min(step, max(0.0, stop - time.perf_counter()))
            ready, rest = self.ray.wait(pending, num_returns=1, timeout=step)
            if ready and rest:
                more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            self._drain()
            if ready or self.sink is None or (stop is not None and time.perf_counter() >= stop):
                return ready

    def _drain(self, force: bool = False) -> None:
        """Participants' progress events to the display, at most every poll interval (a
        drain is a round trip to the sink actor: per answer, at 10 000 participants, it
        would cost more than the calls)."""
        now = time.perf_counter()
        if self.sink is None or (not force and now - self._drained < PROGRESS_POLL_SECONDS):
            return
        self._drained = now
        for event in self.ray.get(self.sink.drain.remote()):
            self.report(event)


class _Bundle:
    """Calls sent together as one Ray call; its slot has room again once all have answered."""

    __slots__ = ("calls", "open")

    def __init__(self, calls: list[Call]):
        self.calls, self.open = calls, len(calls)


class _Queue:
    """Calls that may go out, per slot, best first, gathered into their bundles; `take`
    hands out the bundles the slots and the window have room for. A bundle waits until
    every participant it has in that step is ready for it, so its members are the same in
    every run, whatever order the answers came in."""

    def __init__(
        self, slots: Any, window: int | None, unit: Callable[[int, int], Any], steps: Sequence[Step]
    ):
        self.slots, self.window, self.unit = slots, window, unit
        self.sizes: dict[tuple[Any, int], int] = {}
        """How many participants each bundle of each step has: (unit, step) -> count."""
        for k, step in enumerate(steps):
            for i in step.who:
                key = (unit(i, k), k)
                self.sizes[key] = self.sizes.get(key, 0) + 1
        self.gathering: dict[tuple[Any, int], list[tuple]] = {}
        self.ready: dict[int, list[tuple]] = {}  # slot -> heap of (priority, order, members)
        self.busy: dict[int, int] = {}  # slot -> bundles out
        self.heads: list[tuple] = []  # (priority of the slot's best, slot) for slots with room
        self.listed: set[int] = set()
        self.count = 0  # calls not yet sent
        self.running = 0  # bundles out
        self.order = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def push(self, entry: tuple, k: int) -> None:
        """Participant entry[1], ready for step k at its chain's position entry[2]."""
        i = entry[1]
        unit = self.unit(i, k)
        members = self.gathering.setdefault((unit, k), [])
        members.append(entry)
        self.count += 1
        if len(members) < self.sizes[unit, k]:
            return
        del self.gathering[unit, k]
        slot = self.slots.slot(i)
        members.sort(key=lambda e: e[1])
        self.order += 1
        heapq.heappush(self.ready.setdefault(slot, []), (min(e[0] for e in members), self.order, members))
        self._list(slot)

    def free(self, call: Call) -> None:
        call.bundle.open -= 1
        if call.bundle.open:
            return
        # Its calls and the bundle point at each other: let go, or every answered call (and
        # the object refs it holds) would wait for the garbage collector.
        call.bundle.calls = []
        slot = self.slots.slot(call.index)
        self.busy[slot] -= 1
        self.running -= 1
        self._list(slot)

    def _list(self, slot: int) -> None:
        ready = self.ready.get(slot)
        if ready and slot not in self.listed and self.busy.get(slot, 0) < self.slots.room:
            heapq.heappush(self.heads, (ready[0][0], slot))
            self.listed.add(slot)

    def take(self) -> list[list[tuple[int, int]]]:
        """The bundles to send now, each as (participant, position in its chain) pairs."""
        out = []
        room = math.inf if self.window is None else self.window - self.running
        while self.heads and len(out) < room:
            _, slot = heapq.heappop(self.heads)
            self.listed.discard(slot)
            _, _, members = heapq.heappop(self.ready[slot])
            self.count -= len(members)
            self.busy[slot] = self.busy.get(slot, 0) + 1
            self.running += 1
            out.append([(i, pos) for _, i, pos in members])
            self._list(slot)
        return out


def _env_failed(exc: Exception) -> bool:
    """Whether an actor died because its runtime_env could not be set up (a restart would
    fail the same way)."""
    return "RuntimeEnvSetupError" in str(exc) or "runtime environment" in str(exc).lower()


def _first_line(exc: Exception) -> str:
    """The cause Ray gives, in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line or "failed" in line.lower()]
    return (useful or lines or [type(exc).__name__])[-1][:400]


def _plain(text: str) -> str:
    """Ray's text without its terminal colours (a file is read in an editor, not a terminal)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
