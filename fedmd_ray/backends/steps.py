"""The shape of `steps`, which both backends offer: FedMD steps that each participant takes
in order, needing nobody else's, so a backend may overlap one participant's next step with
another's current one (RayBackend.steps) or run them phase by phase (LocalBackend.steps).

A backend that chains steps may also take the next round's communicate as the last step
(`ahead`): a participant's scores for round r+1 depend only on its own model after round r,
so they can be computed while others still digest, instead of behind a barrier at the start
of the next round. A failure in that step is not raised there (its result is None): the
caller runs the step again in its own round, after this round's results are written, where
it fails as it would have."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Step = tuple[str, Sequence[int], tuple]
"""One FedMD step for some participants: (backend method, who, its arguments after who)."""
Announce = Callable[[list[str], list[int]], None]
"""Told, before steps start, which phases run together and for whom (the progress display)."""

PHASE_OF = {"logits": "communicate"}
"""The phase a backend method's calls are reported under, where the two names differ."""


def phase_of(method: str) -> str:
    return PHASE_OF.get(method, method)
