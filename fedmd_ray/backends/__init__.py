"""How participants run: `local` (sequentially, in this process) or `ray` (actors).

Both backends expose the same calls, one per FedMD step, each applied to the chosen
participants; scores and the consensus are opaque handles (arrays for `local`, object refs
for `ray`) so the driver never copies them. This package is the only code that knows Ray:

  local.py        the in-process backend, and the reference the Ray backend must match
  resources.py    starting or joining Ray; CPUs, GPUs, threads per actor; placement groups
  actors.py       the actors: a participant's own, a pool worker, the consensus, progress
  slots.py        a participant's own actor vs a pool, behind one send/answered/bring_back
  restarts.py     the journal that brings a dead actor back exactly
  schedule.py     spread or stack each round phase's calls, from what they measurably cost
  shipping.py     users' code files sent to the actors
  steps.py        the shape of `steps`: each participant's post-consensus steps, in order
  ray_backend.py  the Ray backend: submit with a concurrency window, chain, gather, restart

The driver of a Ray run never imports torch (participant.py, models.py, local.py do): the
models are checked on the consensus actor, and the driver stays ~0.5 GiB lighter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedmd_ray.backends.resources import concurrency_window, even_share, init_ray, plan_resources
from fedmd_ray.config import Config
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.tasks import Task, participant_args

__all__ = [
    "LocalBackend",
    "concurrency_window",
    "even_share",
    "init_ray",
    "make_backend",
    "participant_args",
    "plan_resources",
]


def make_backend(
    config: Config,
    task: Task,
    specs: Sequence[ParticipantSpec],
    report: Callable[[dict], None] | None = None,
):
    """The backend resources.backend names; `report` receives progress events."""
    if config.resources.backend == "local":
        from fedmd_ray.backends.local import LocalBackend

        return LocalBackend(config, task, specs, report)
    from fedmd_ray.backends.ray_backend import RayBackend

    return RayBackend(config, task, specs, report)


def __getattr__(name: str):
    # The local backend loads torch; a driver of Ray actors never needs it (nor its ~0.5 GiB).
    if name == "LocalBackend":
        from fedmd_ray.backends.local import LocalBackend

        return LocalBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
