"""The restart journal: what it takes to bring a dead participant actor back exactly.

A participant's own actor holds its state (weights, optimizers) in process memory, so when
the process dies the state is gone with it. For each participant the journal keeps

- `saved`: a snapshot of its state in the object store that is known to have been taken;
- `calls`: every state-changing call sent to it since that snapshot, in order.

A fresh actor given `saved` and then `calls` replayed reaches exactly the state the dead one
had: every participant call seeds itself from (seed, participant, phase, round), so a replay
computes the same numbers.

Snapshots are not waited for. At the end of a round `get_state` is queued on the actor and
recorded as *pending*, with the journal's length at that moment. The one invariant:

    a pending snapshot counts (it becomes `saved`, and the calls before it leave the
    journal) only once the actor has answered a call that was queued after it.

An actor runs its calls in order, so that answer proves the snapshot was taken. Until then a
restart uses the previous `saved` with the longer journal, and the pending snapshot, which
may never have been taken, is dropped.

A pool needs none of this: each pool call carries the participant's state in and out.
"""

from __future__ import annotations

from typing import Any


class RestartJournal:
    def __init__(self, participants: int):
        self.saved: list[Any] = [None] * participants
        self.calls: list[list[Any]] = [[] for _ in range(participants)]
        self.pending: list[tuple[Any, int] | None] = [None] * participants

    def record(self, index: int, call: Any) -> None:
        """A state-changing call was sent."""
        self.calls[index].append(call)

    def snapshot(self, index: int, state_ref: Any) -> None:
        """A snapshot was queued on the actor, behind every call in the journal so far."""
        self.pending[index] = (state_ref, len(self.calls[index]))

    def confirm(self, index: int) -> None:
        """The actor answered a call queued after the pending snapshot: it was taken."""
        if self.pending[index] is None:
            return
        state_ref, position = self.pending[index]
        self.saved[index] = state_ref
        del self.calls[index][:position]
        self.pending[index] = None

    def replay(self, index: int, upto: Any) -> tuple[Any, list[Any]]:
        """For a fresh actor of participant `index`: the state to start from and the calls
        to replay before `upto` (the call that found the actor dead, resent after them)."""
        self.pending[index] = None
        calls = self.calls[index]
        return self.saved[index], calls[: calls.index(upto)] if upto in calls else list(calls)
