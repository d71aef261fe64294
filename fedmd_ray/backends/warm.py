"""Actors kept alive from one run to the next in the same program (resources.reuse_actors),
as Ray Tune's `reuse_actors` keeps trial actors.

Starting a participant actor is a process start and an import of torch: ~3 s of CPU on
this project's 2-core machine, which is most of a small run on Ray, and a program that runs
many (seeds, a comparison of variants, a test suite) pays it every time. A kept actor drops
its participant at the end of a run and takes the next run's participant of the same
resources and code; every call seeds itself, so its numbers are a fresh actor's.

A kept actor holds its CPUs and GPUs until it is taken again, Ray shuts down, or
`release()` is called; a run that needs other resources (or a placement group) releases
the kept actors first.
"""

from __future__ import annotations

import json
from typing import Any

PING_SECONDS = 5.0


class _Kept:
    def __init__(self) -> None:
        self.session: str | None = None
        self.actors: dict[str, list[Any]] = {}

    def _current(self, ray: Any) -> None:
        """Forget actors of an earlier Ray (they died with it)."""
        context = ray.get_runtime_context()
        session = f"{context.gcs_address}/{context.get_job_id()}"
        if session != self.session:
            self.session, self.actors = session, {}

    def take(self, ray: Any, kind: str, options: dict[str, Any]) -> Any | None:
        """A kept, live actor of `kind` made with `options`, or None."""
        self._current(ray)
        kept = self.actors.get(key(kind, options), [])
        while kept:
            actor = kept.pop()
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=PING_SECONDS)
                return actor
            except Exception:  # died while kept: make another
                continue
        return None

    def keep(self, ray: Any, kind: str, options: dict[str, Any], actor: Any) -> None:
        self._current(ray)
        self.actors.setdefault(key(kind, options), []).append(actor)

    def release(self, ray: Any, keep: set[str] | None = None) -> None:
        """Kill the kept actors (but those of the kinds/options in `keep`)."""
        if not ray.is_initialized():
            self.actors = {}
            return
        self._current(ray)
        for key in list(self.actors):
            if keep is None or key not in keep:
                for actor in self.actors.pop(key):
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # already gone
                        pass


def key(kind: str, options: dict[str, Any]) -> str:
    """What a kept actor is found by: its kind, resources and code (not its name)."""
    wanted = {k: v for k, v in options.items() if k in ("num_cpus", "num_gpus", "runtime_env")}
    return kind + json.dumps(wanted, sort_keys=True, default=str)


KEPT = _Kept()


def release() -> None:
    """Let every actor kept for reuse go (their CPUs and GPUs with them)."""
    import ray

    KEPT.release(ray)
