"""Where a participant's call runs: its own actor, or an actor of a pool. Both offer the
same things, so the dispatcher never asks which it has:

- `slot(index)`, `room`: which actor serves a participant, and how many Ray calls may wait
  on one actor at once;
- `unit(index)`: the bundle a participant's calls travel in (a pool sends the calls of up
  to BUNDLE participants of one model on one actor as one Ray call; its own actor: alone);
- `send(calls)`: submit one bundle's calls, answer (metrics ref, payload ref) for each;
- `answered(call)`: the call's metrics came back;
- `bring_back(calls)`: their actor died; start a new one, restore where it was, resend;
- `snapshot(who)`: end of round, keep states a restart can start from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fedmd_ray.backends.actors import ParticipantActor, PoolWorker, describe_ray_error, held_budget, lost
from fedmd_ray.backends.resources import Placement
from fedmd_ray.backends.restarts import RestartJournal
from fedmd_ray.backends.warm import KEPT
from fedmd_ray.errors import ParticipantError, ResourceError, StateLost
from fedmd_ray.phases import Phase
from fedmd_ray.spec import ParticipantSpec

BUNDLE = 64
"""Participants whose calls a pool sends as one Ray call: the same model on the same actor,
in index order. Fixed by the participants alone, never by timing, so that grouped
computation (resources.group) sees the same groups in every run. A Ray call costs the driver
and the actor about a millisecond and ~40-60 KiB of bookkeeping while it is out: at 10 000
participants, one per participant and phase was most of a tiny model's round."""

RESTART_WAIT_S = 300.0
"""How long an actor restarted after its process or node died may wait for a node with room
for it (an autoscaler adding one) before the run stops, its last checkpoint kept."""

POOL_DEPTH = 2
"""Bundles queued at once per pool actor: one computing, one waiting, so the actor never
idles while the driver refills it."""


class Call:
    """One submitted participant call, kept until it answers so it can be resubmitted."""

    __slots__ = (
        "index",
        "phase",
        "args",
        "state",
        "version",
        "metrics",
        "payload",
        "new_state",
        "actor",
        "confirms",
        "pos",
        "ref",
        "bundle",
    )

    def __init__(self, index: int, phase: Phase, args: tuple, pos: int = 0):
        self.index, self.phase, self.args, self.pos = index, phase, args, pos
        self.state = self.metrics = self.payload = self.new_state = self.actor = None
        self.ref = self.bundle = None  # its metrics ref while out; the calls sent with it
        self.version = 0
        self.confirms = False  # queued after a pending snapshot: its answer confirms it

    def other_answers(self) -> list[Any]:
        """The refs of what this call answered besides its metrics: its payload, and the
        object its new state is in (its own, or its bundle's: `ActorPool.send`)."""
        state = self.new_state[0] if isinstance(self.new_state, tuple) else self.new_state
        return [ref for ref in (self.payload, state) if ref is not None]

    def remote(self, actor: Any, num_returns: int, *head: Any) -> Any:
        """Submit this call to `actor`'s `call` method, `head` before its own arguments."""
        return actor.call.options(num_returns=num_returns).remote(*head, self.phase, *self.args)


class Shared:
    """Object refs every actor is built from: public data, validation and test sets, each
    participant's private data, and the progress sink."""

    def __init__(self, public: tuple, val: Any, test: Any, private: list, sink: Any):
        self.public, self.val, self.test, self.private, self.sink = public, val, test, private, sink


class DedicatedActors:
    """One actor per participant, holding its state in memory; restarts use the journal."""

    room = 1
    """A participant's calls depend on each other: one at a time."""

    def __init__(
        self,
        ray: Any,
        specs: Sequence[ParticipantSpec],
        shared: Shared,
        placement: Placement,
        tag: str,
        reuse: bool = False,
        give_back: bool = False,
    ):
        self.ray, self.specs, self.shared, self.placement, self.tag = ray, list(specs), shared, placement, tag
        self.reuse = reuse
        self.give_back = give_back
        """The actors take turns on the cores (the dispatcher's window): each hands the
        memory its call freed back to the system when the call ends (heap.py)."""
        self.journal = RestartJournal(len(self.specs))
        self.actors = [self.start(i) for i in range(len(self.specs))]

    def slot(self, index: int) -> int:
        return index

    def unit(self, index: int) -> int:
        return index

    def start(self, slot: int, generation: int = 0) -> Any:
        spec, s = self.specs[slot], self.shared
        options = self.placement.actor_options(slot)
        data = (*s.public, s.val, s.private[slot], s.test)
        kept = KEPT.take(self.ray, "participant", options) if self.reuse and generation == 0 else None
        if kept is not None:
            # queued before any call
            kept.adopt.remote(spec, *data, restored=False, sink=s.sink, give_back=self.give_back)
            return kept
        options["name"] = f"fedmd-{self.tag}/{spec.name}" + (f"-r{generation}" if generation else "")
        cls = self.ray.remote(ParticipantActor).options(**options)
        return cls.remote(spec, *data, restored=generation > 0, sink=s.sink, give_back=self.give_back)

    def stop(self) -> None:
        """The run ended: keep the actors for the next one (reuse), or end them."""
        for slot, actor in enumerate(self.actors):
            if self.reuse:
                actor.release.remote()
                KEPT.keep(self.ray, "participant", self.placement.actor_options(slot), actor)
            else:
                self.ray.kill(actor, no_restart=True)

    def send(self, calls: Sequence[Call], replay: bool = False) -> list[tuple[Any, Any]]:
        (call,) = calls  # a participant's calls go one by one
        actor = call.actor = self.actors[call.index]
        if not replay:
            if call.phase.mutating:
                self.journal.record(call.index, call)
            call.confirms = self.journal.pending[call.index] is not None
        return [tuple(call.remote(actor, 2))]

    def answered(self, call: Call) -> None:
        if call.confirms:
            self.journal.confirm(call.index)

    def bring_back(self, calls: Sequence[Call], generation: int) -> list[tuple[Any, Any]]:
        (call,) = calls
        i = call.index
        actor = self.actors[i] = self.start(i, generation)
        name = self.specs[i].name
        started(self.ray, actor, name, call.phase, self.placement.actor_options(i))
        saved, earlier = self.journal.replay(i, call)
        if saved is not None:
            # Waited for: a state that went with its node must not leave the actor as new,
            # computing other numbers from there on.
            try:
                self.ray.get(actor.set_state.remote(saved, trusted=True))
            except Exception as exc:
                if lost(exc):
                    raise StateLost(name, "its last state") from None
                raise ParticipantError(name, call.phase, describe_ray_error(exc)) from None
        for c in earlier:
            c.remote(actor, 2)
        return self.send(calls, replay=True)

    def snapshot(self, who: Sequence[int]) -> None:
        for i in who:
            self.journal.snapshot(i, self.actors[i].state.remote())


class ActorPool:
    """A few actors serving many participants in turn (participant i on actor i mod k); each
    participant's state waits in the object store between its calls and travels with each.
    Calls go in bundles (BUNDLE); with `together` (resources.group), the members of a bundle
    that can compute a step as one model do (grouped.py)."""

    room = POOL_DEPTH

    def __init__(
        self,
        ray: Any,
        specs: Sequence[ParticipantSpec],
        shared: Shared,
        placement: Placement,
        tag: str,
        together: bool = False,
    ):
        self.ray, self.specs, self.shared, self.placement, self.tag = ray, list(specs), shared, placement, tag
        self.together = together
        self.size = placement.slots
        self.states: list[Any] = [None] * len(self.specs)
        # Specs go to the object store once; a pool actor fetches one only to rebuild its
        # participant (at 10 000 participants, pickling every spec into every call was
        # hundreds of MiB a round).
        self.spec_refs = [ray.put(spec) for spec in self.specs]
        self.held_budget = held_budget(ray.nodes(), self.size)
        self.versions = [0] * len(self.specs)
        """How many state-changing calls of each participant have been kept: a pool actor
        that still holds that version of the participant in memory skips reloading it."""
        self.units = bundles(self.specs, self.size)
        self.sizes = Counter(self.units)  # members of each bundle
        self.actors = [self.start(k) for k in range(self.size)]

    def slot(self, index: int) -> int:
        return index % self.size

    def unit(self, index: int) -> int:
        return self.units[index]

    def start(self, slot: int, generation: int = 0) -> Any:
        s = self.shared
        options = self.placement.actor_options(slot)
        options["name"] = f"fedmd-{self.tag}/pool-{slot:02d}" + (f"-r{generation}" if generation else "")
        cls = self.ray.remote(PoolWorker).options(**options)
        return cls.remote(*s.public, s.val, s.test, s.sink, self.held_budget)

    def send(self, calls: Sequence[Call], replay: bool = False) -> list[tuple[Any, Any]]:
        """One Ray call for the bundle; each member's metrics and payload come back as
        objects of their own, and its new state too unless the bundle is whole: then the
        members' states come back as one object (PoolWorker.call says why), and each
        member's state is that object and its position in it."""
        first = calls[0]
        actor = self.actors[self.slot(first.index)]
        boxes = []
        for call in calls:
            if not replay:
                call.state, call.version = self.states[call.index], self.versions[call.index]
            call.actor = actor
            # Spec, private data and state travel as refs inside a list, which Ray does not
            # resolve: the actor fetches them only when it does not hold this version already.
            boxes.append([self.spec_refs[call.index], self.shared.private[call.index], call.state])
        pack = len(calls) == self.sizes[self.units[first.index]]
        each = 2 if pack else 3
        refs = actor.call.options(num_returns=each * len(calls) + int(pack)).remote(
            [c.index for c in calls],
            boxes,
            [c.version for c in calls],
            replay,
            self.together,
            pack,
            first.phase,
            *first.args,
        )
        out = []
        for j, call in enumerate(calls):
            call.new_state = None  # a phase that changes no state: its ref holds None
            if call.phase.mutating:
                call.new_state = (refs[-1], j) if pack else refs[3 * j + 2]
            out.append((refs[each * j], refs[each * j + 1]))
        return out

    def answered(self, call: Call) -> None:
        if call.new_state is not None:
            self.states[call.index] = call.new_state
            self.versions[call.index] = call.version + 1

    def bring_back(self, calls: Sequence[Call], generation: int) -> list[tuple[Any, Any]]:
        slot = self.slot(calls[0].index)
        actor = self.actors[slot] = self.start(slot, generation)
        name = self.specs[calls[0].index].name
        options = self.placement.actor_options(slot)
        started(self.ray, actor, name, calls[0].phase, options, f"pool actor {slot}")
        return self.send(calls, replay=True)  # each call carries the state it started from

    def snapshot(self, who: Sequence[int]) -> None:
        """Every state is in the object store already."""

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


def started(
    ray: Any, actor: Any, name: str, phase: Phase, options: dict[str, Any], what: str = "actor"
) -> None:
    """Wait for a restarted actor to be up. One that finds no room (its node gone, and with
    it the resources it held) stops the run after RESTART_WAIT_S, saying so, rather than
    waiting for ever."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=RESTART_WAIT_S)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor, no_restart=True)
        need = " and ".join(
            f"{options[k]:g} {unit}"
            for k, unit in (("num_cpus", "CPU"), ("num_gpus", "GPU"))
            if options.get(k)
        )
        free = ray.available_resources()
        raise ResourceError(
            f"{name}'s {what} could not be restarted: no node had room for it ({need or 'no CPU'}) for "
            f"{RESTART_WAIT_S:.0f} s (free now: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} "
            "GPU); a node it ran on may be gone. Add a node, then continue the run with "
            "--resume: its last checkpoint is kept."
        ) from None
    except Exception as exc:  # its __init__ failed
        raise ParticipantError(name, phase, describe_ray_error(exc)) from None


def bundles(specs: Sequence[ParticipantSpec], actors: int, size: int = BUNDLE) -> list[int]:
    """Each participant's bundle: participants of one model on one actor (i mod `actors`),
    `size` at a time in index order."""
    by: dict[tuple[int, str], list[int]] = {}
    for i, spec in enumerate(specs):
        by.setdefault((i % actors, spec.model), []).append(i)
    units = [0] * len(specs)
    count = 0
    for members in by.values():
        for start in range(0, len(members), size):
            for i in members[start : start + size]:
                units[i] = count
            count += 1
    return units
