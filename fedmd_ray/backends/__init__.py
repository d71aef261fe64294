"""How participants run: `local` (sequentially, in this process) or `ray` (actors). Both
satisfy `protocol.Backend`; this package is the only code that knows Ray:

  local.py        the in-process backend, and the reference the Ray backend must match
  resources.py    starting or joining Ray; CPUs, GPUs, threads per participant; placement
  actors.py       the actors: a participant's own, a pool worker, the consensus, progress
  slots.py        a participant's own actor vs a pool, behind one send/answered/bring_back
  dispatch.py     the one engine every call goes through: per-participant chains of calls
  restarts.py     the journal that brings a dead actor back exactly
  shipping.py     users' code files sent to the actors
  ray_backend.py  the Ray backend: the FedMD steps as dispatcher runs, the consensus actor

The driver of a Ray run never imports torch (participant.py, models.py, local.py do): each
participant checks its own model in its actor, and the driver stays ~0.5 GiB lighter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedmd_ray.config import Config
from fedmd_ray.protocol import Backend
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.tasks import Task


def make_backend(
    config: Config,
    task: Task,
    specs: Sequence[ParticipantSpec],
    report: Callable[[dict], None] | None = None,
) -> Backend:
    """The backend resources.backend names; `report` receives progress events."""
    if config.resources.backend == "local":
        # The local backend loads torch; a driver of Ray actors never needs it (~0.5 GiB).
        from fedmd_ray.backends.local import LocalBackend

        return LocalBackend(config, task, specs, report)
    from fedmd_ray.backends.ray_backend import RayBackend

    return RayBackend(config, task, specs, report)
