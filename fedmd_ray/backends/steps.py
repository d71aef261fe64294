"""The shape of `steps`, which both backends offer: FedMD steps that each participant takes
in order, needing nobody else's, so a backend may overlap one participant's next step with
another's current one (RayBackend.steps) or run them phase by phase (LocalBackend.steps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Step = tuple[str, Sequence[int], tuple]
"""One FedMD step for some participants: (backend method, who, its arguments after who)."""
Announce = Callable[[list[str], list[int]], None]
"""Told, before steps start, which steps run together and for whom (the progress display)."""
