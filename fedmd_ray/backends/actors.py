"""The Ray actors: a participant with its own actor, a pool worker that serves many
participants in turn, and the consensus actor. What crosses from them to the driver is
metrics only; scores and states stay in the object store."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmd_ray.consensus import form_consensus
from fedmd_ray.errors import ConsensusError, Failed, FedMDError, ParticipantError, StateLost
from fedmd_ray.heap import give_back_freed_memory
from fedmd_ray.phases import Phase
from fedmd_ray.procfs import private_memory
from fedmd_ray.protocol import AggregatorStatus, ConsensusPlan
from fedmd_ray.spec import ParticipantSpec

HELD_BYTES = 2**30
"""A pool actor's memory (its own, not the object store's) up to which it keeps the
participants it serves built between calls, unless the backend gives it a budget."""


GIVE_BACK_ABOVE = 256 * 2**20
"""An actor that takes turns on a core keeps at most this much more memory than it held
after its last give-back (or when built; heap.py). The smoke preset's actors stay within
110-220 MiB of what they held when built, which each next call reuses (given back after
every call, the run took ~2 % longer); the paper CNNs' grow by 1.5-2.5 GiB."""


HELD_SHARE = 0.4
"""The share of Ray's memory resource (the RAM it leaves to processes, the object store
aside) that a pool's actors together may keep participants built in."""


def held_budget(nodes: list[dict], actors: int) -> int:
    """Each of a pool's `actors` may keep participants built up to this much of its own
    memory: HELD_SHARE of the alive `nodes`' memory resource, split evenly."""
    memory = sum(float(n.get("Resources", {}).get("memory", 0)) for n in nodes if n.get("Alive"))
    return int(HELD_SHARE * memory / max(1, actors)) if memory else HELD_BYTES


def cap_gpu_memory() -> float | None:
    """Hold this actor to the fraction of the GPU Ray gave it. Ray's fractional GPUs are
    only bookkeeping: without a cap, PyTorch's caching allocator keeps every block it ever
    used, and ten actors at 0.1 GPU each held 4 GiB apiece on an H100 (half the card) where
    they needed under 0.3 GiB. With the cap the allocator frees its cache before it passes
    the share, and an actor that truly needs more fails with its own out-of-memory error
    naming it, rather than a neighbour failing. Returns the fraction set, if any."""
    import ray
    import torch

    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    if not 0 < share < 1 or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(share)
    return share


def _reporter(sink: Any):
    """Progress events from inside an actor go to the driver's sink actor, fire and forget:
    the participant never waits on the display."""
    if sink is None:
        return None
    return lambda event: sink.post.remote(event)


class ParticipantActor:
    """A participant as a Ray actor. Every call answers (metrics, payload) as two objects, so
    the driver reads the small metrics (and learns of failures) while the payload (scores)
    stays in the object store for whoever needs it. The participant is built here, in the
    actor: the driver defines this class without loading torch. A participant that cannot
    be built (its model, its digest loss) answers every call with why, naming itself: an
    actor whose constructor raised would look dead to Ray, and be restarted."""

    def __init__(
        self,
        spec: ParticipantSpec,
        *data: Any,
        restored: bool = False,
        sink: Any = None,
        give_back: bool = False,
    ):
        cap_gpu_memory()
        self.adopt(spec, *data, restored=restored, sink=sink, give_back=give_back)

    def adopt(
        self,
        spec: ParticipantSpec,
        *data: Any,
        restored: bool = False,
        sink: Any = None,
        give_back: bool = False,
    ) -> None:
        """Become the participant `spec` describes (a kept actor's next run: warm.py). With
        `give_back`, the memory a call freed goes back to the system when it ends (heap.py):
        this actor waits for a turn on a core between its calls."""
        from fedmd_ray.participant import build_participant

        self.participant, self.failure, self.give_back = None, None, give_back
        self.kept_from = private_memory()
        try:
            self.participant = build_participant(spec, *data)
        except FedMDError as exc:
            self.failure = exc
            return
        self.participant.restored = restored
        self.participant.report = _reporter(sink)

    def release(self) -> None:
        """Let the participant go (its run ended; the actor is kept for another)."""
        import gc

        self.participant, self.failure = None, None
        gc.collect()

    def call(self, phase: Phase, *args: Any) -> tuple[Any, Any]:
        from fedmd_ray.participant import run_call

        if self.failure is not None:
            raise self.failure
        metrics, payload = run_call(self.participant, phase, *args)
        if self.give_back and private_memory() - self.kept_from > GIVE_BACK_ABOVE:
            give_back_freed_memory()
            self.kept_from = private_memory()
        if phase == Phase.SETUP:
            import ray

            metrics["gpu_share"] = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
        return metrics, payload

    def node(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def state(self) -> bytes:
        """The participant's state, for a restart to start from."""
        return self.participant.get_state() if self.participant is not None else b""

    def set_state(self, *args: Any, **kwargs: Any) -> None:
        if self.participant is not None:
            self.participant.set_state(*args, **kwargs)


class PoolWorker:
    """One actor of a pool serving many participants: for each call it rebuilds the
    participant from its spec, private data and state (unless it still holds it), runs the
    call, and hands the new state back to the object store. The public data and test set
    stay mapped here."""

    def __init__(
        self,
        public_x: np.ndarray,
        public_y: np.ndarray,
        val: tuple,
        test: tuple,
        sink: Any = None,
        held_budget: int = HELD_BYTES,
    ):
        cap_gpu_memory()
        self.shared = (public_x, public_y, val)
        self.test = test
        self.report = _reporter(sink)
        self.held: dict[int, tuple[int, Any]] = {}
        """Participants kept built between calls: index -> (state version, participant)."""
        self.held_budget = held_budget
        self.inputs: dict[int, tuple[ParticipantSpec, tuple]] = {}

    def call(
        self,
        indices: list[int],
        boxes: list[list],
        versions: list[int],
        replay: bool,
        together: bool,
        pack: bool,
        phase: Phase,
        *args: Any,
    ) -> tuple:
        """One bundle of participants' calls of `phase`: for each, (metrics, payload, new
        state) in a row; with `pack`, for each (metrics, payload), then all their new states
        as one object (None for a phase that changes no state). `boxes`: refs to each one's
        spec, private data and state (its own object, or a packed one and its position
        there), in lists so that Ray does not fetch them: they are needed only for a
        participant this actor does not hold at that version. A participant that fails
        answers Failed for its metrics (grouped.py) and None for its state; the others'
        answers stand.

        Why pack: a small state (a tiny CNN's, 23 KiB) is under Ray's 100 KiB inline limit,
        so returned alone it is copied into the driver's own memory, and copied again into
        the object store by the driver when a later call carries it (at 10 000 participants,
        most of the driver's heap). Packed, a bundle's states go to the object store as one
        object. The driver packs whole bundles only: a packed object lives until the last
        of its members moves on, so with train.participation below 1 a bundle's few sampled
        members would keep older packs alive (2.5-3x the states, simulated)."""
        from fedmd_ray.grouped import run_bundle

        built: dict[int, Any] = {}
        answers: dict[int, Any] = {}
        fetched: dict[Any, Any] = {}  # members that left the same bundle: one fetch
        for k, (index, boxed, version) in enumerate(zip(indices, boxes, versions)):
            try:
                built[k] = self._participant(index, boxed, version, replay, fetched)
            except Exception as exc:
                answers[k] = Failed(exc)
        fetched.clear()
        answers.update(zip(built, run_bundle(list(built.values()), phase, args, together)))
        out: list[Any] = []
        states: list[Any] = []
        for k, (index, version) in enumerate(zip(indices, versions)):
            answer = answers[k]
            if isinstance(answer, Failed):
                self.held.pop(index, None)  # it may have changed part way: rebuilt next time
                answer, state = (answer, None), None
            else:
                participant = built[k]
                state = participant.snapshot() if phase.mutating else None
                self._hold(index, version + phase.mutating, participant)
            out += answer if pack else [*answer, state]
            states.append(state)
        return (*out, states if phase.mutating else None) if pack else tuple(out)

    def _participant(self, index: int, boxed: list, version: int, replay: bool, fetched: dict) -> Any:
        """Participant `index` at state `version`: held here already, or rebuilt."""
        import ray

        from fedmd_ray.participant import build_participant

        kept = self.held.get(index)
        if kept is not None and kept[0] == version and not replay:
            return kept[1]  # the same state it left here with: no rebuild, no reload
        spec_ref, private_ref, state_ref = boxed
        if index not in self.inputs:
            # A participant's spec and private data never change (a few KiB): kept from
            # the first call on, so a participant not held costs one fetch, its state.
            self.inputs[index] = (ray.get(spec_ref), ray.get(private_ref))
        spec, private = self.inputs[index]
        state = None
        if isinstance(state_ref, tuple):  # packed with its bundle's: (ref, position)
            ref, position = state_ref
            if ref not in fetched:
                fetched[ref] = fetch(ray, ref, spec.name, "its state")
            state = fetched[ref][position]
        elif state_ref is not None:
            state = fetch(ray, state_ref, spec.name, "its state")
        participant = build_participant(spec, *self.shared, private, self.test)
        participant.report = self.report
        if isinstance(state, dict):
            participant.restore(state, restored=replay)
        participant.restored = participant.restored or replay
        return participant

    def node(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _hold(self, index: int, version: int, participant: Any) -> None:
        """Keep the participant built for its next call while this actor's own memory is
        under its budget: past that, the first ones stay held and the rest are rebuilt each
        call (participants come round in a fixed order, in which evicting the oldest would
        never hit). Measured, not estimated: a tiny CNN's built participant costs ~0.5 MiB
        for a 120 KiB state, a ResNet's about twice its state."""
        if index in self.held or private_memory() < self.held_budget:
            self.held[index] = (version, participant)


class Aggregator:
    """Forms the consensus next to the data, as a long-lived actor (a plain task's worker
    would be reaped between rounds and cost a process start each time). Needs numpy only.

    The score refs come wrapped in a list so this actor, not Ray, reads them and can name a
    participant whose scores failed. Returns (status, consensus): the driver reads only the
    small status; the consensus stays in the object store for the participants."""

    def aggregate(self, plan: ConsensusPlan, names: list[str], wrapped: list) -> tuple[AggregatorStatus, Any]:
        import ray

        scores = []
        for name, ref in zip(names, wrapped):
            try:
                scores.append(ray.get(ref))
            except Exception as exc:  # the participant's own failure, re-raised by Ray
                return AggregatorStatus(error=describe_ray_error(exc), participant=name, lost=lost(exc)), None
        try:
            consensus = form_consensus(scores, names, plan)
        except ConsensusError as exc:
            return AggregatorStatus(error=str(exc)), None
        return AggregatorStatus(bytes=int(consensus.nbytes)), consensus


class ProgressSink:
    """Collects progress events from participant actors until the driver drains them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def post(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        """Every event posted since the last drain."""
        events, self.events = self.events, []
        return events


def metrics_only(value: Any, name: str, phase: str) -> Any:
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


def lost(exc: BaseException) -> bool:
    """Whether `exc` says an object was lost (its node died, and Ray cannot compute it again:
    actor calls are never rerun by Ray), raised as it is or as the cause of a call that
    needed it."""
    from ray.exceptions import ObjectLostError

    return isinstance(exc, ObjectLostError) or isinstance(getattr(exc, "cause", None), ObjectLostError)


def fetch(ray: Any, ref: Any, participant: str, what: str) -> Any:
    """ray.get(ref), where an object that went with its node is StateLost: `participant`
    lost `what`."""
    try:
        return ray.get(ref)
    except Exception as exc:
        if lost(exc):
            raise StateLost(participant, what) from None
        raise


def describe_ray_error(exc: Exception) -> str:
    """The participant's own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    kind = type(exc).__name__
    if "OutOfMemoryError" in kind:  # Ray's memory monitor killed the worker: the machine's RAM
        return (
            "Ray stopped it because the machine ran low on memory (RAM). Let fewer participants "
            "compute at once (resources.max_concurrent), serve them from a pool of actors "
            "(resources.actors), or give Ray a machine with more memory."
        )
    if "ActorDied" in kind or "ActorError" in kind or "ActorUnavailable" in kind:
        return (
            "its actor process died (killed, out of memory, or crashed). "
            f"Ray said: {text[0] if text else kind}"
        )
    return f"{kind}: {text[-1] if text else ''}"
