"""What the Ray backend asks of the cluster: joining or starting Ray, each actor's CPUs,
GPUs and torch threads, how many may compute at once, and where the actors are placed
(a placement group of our own, or a Ray Tune trial's)."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from fedmd_ray.config import Config, gpu_share, model_share
from fedmd_ray.errors import ResourceError

PLACEMENT_TIMEOUT_SECONDS = 60


def init_ray(address: str | None = None, runtime_env: dict[str, Any] | None = None, **kwargs: Any) -> bool:
    """Join `address` ('auto', 'ray://...') or start a local Ray, unless one is running;
    True when this call did (and `runtime_env` became the job's). Without an address, a Ray
    job's RAY_ADDRESS is honoured; otherwise the run gets a Ray of its own rather than
    joining whichever `ray start` cluster this machine last ran. Ray's warnings (security
    notices among them) are shown; its informational lines are not."""
    import ray

    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "local":
        kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    # Ray's driver installs its own SIGTERM handler (a C++ stack dump); the run's own, if it
    # has one (cli.py: stop cleanly, say how to resume), stays in charge.
    handler = (
        signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    )
    _check_reachable(address)
    try:
        with warnings.catch_warnings():
            # Its Ray Client timeout warning says what the ConnectionError below says again.
            warnings.filterwarnings("ignore", message="Ray Client connection timed out")
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env, **kwargs)
    except SystemExit as exc:
        # A SIGTERM while Ray started went to Ray's own handler (exit code 15): hand it to
        # the run's, which stops the run cleanly and says so.
        if exc.code == signal.SIGTERM and callable(handler):
            handler(signal.SIGTERM, None)
        raise
    except ConnectionError as exc:
        # A failed Ray Client connection leaves this process in client mode, where every later
        # ray.init (a local run from the same notebook or test session) fails an assertion.
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - nothing to undo; the connection's error is the news
            pass
        if str(address).startswith("ray://") and os.environ.get("RAY_AUTH_MODE") != "token":
            # Its port answered (_check_reachable), its handshake did not: a cluster with token
            # authentication (Ray's default for one `ray start` made, since 2.59) ignores a
            # client that sends no token, and the client only says it timed out.
            raise ResourceError(
                f"The Ray Client at '{address}' answered but did not let this run in "
                f"({str(exc).rstrip('.')}). If the cluster uses token authentication, set "
                "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file "
                "~/.ray/auth_token: `ray get-auth-token` on the head prints it); otherwise "
                "check that its Ray version is this one's."
            ) from None
        raise ResourceError(
            f"Could not reach the Ray cluster at '{address}': {str(exc).rstrip('.')}. Start it with "
            "`ray start --head` or `ray up cluster.yaml`, or drop --address to run "
            "locally."
        ) from None
    except (ImportError, RuntimeError) as exc:
        if "ray[client]" in str(exc) or "Ray Client" in str(exc):
            raise ResourceError(
                f"--address {address} uses Ray Client, which needs its extra: "
                "pip install 'ray[client]' (the README's install command includes it)."
            ) from None
        raise
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)
    return True


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT or ray://HOST:PORT where nothing answers is said at once: Ray retries a
    dead GCS address for minutes, printing C++ warnings, and a Ray Client one for 30 s."""
    if not address or address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return  # RAY_ADDRESS (a Ray job's own), or a form Ray resolves itself
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # Ray's own error names what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ResourceError(
            f"Could not reach the Ray cluster at '{address}': nothing answers at {host}:{port} "
            f"({exc.strerror or exc}). Start it with `ray start --head` or `ray up cluster.yaml` "
            "(a head's GCS listens on 6379, its Ray Client on ray://HOST:10001), or drop --address "
            "to run locally."
        ) from None


def local_cpus() -> int:
    """The cores this process may run on (what the local backend's participants share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def participant_threads(config: Config, cluster_cpus: float) -> int:
    """Torch threads of every participant: resources.torch_threads, or its CPU share rounded
    down, at least 1. The share is resources.num_cpus, or the cluster's CPUs split evenly
    over the participants (not the actors: a pool's participants get what they would get
    with actors of their own). Both backends and both kinds of actors take it from here, so
    that they run the same arithmetic: torch splits its sums by thread, and the split
    changes how they round."""
    r = config.resources
    if r.torch_threads:
        return r.torch_threads
    share = r.num_cpus if r.num_cpus is not None else cluster_cpus / config.num_participants
    return max(1, int(share + 1e-9))


def even_share(node_cpus: list[float], n: int) -> float:
    """The largest CPU share, in hundredths (Ray's resolution for fractions), of which `n`
    fit on these nodes: an even split of the total may not, when nodes are small (4 nodes of
    1 CPU hold only 8 actors of 0.4)."""
    share = math.floor(sum(node_cpus) / n * 100) / 100
    while share > 0.01 and sum(math.floor(c / share + 1e-9) for c in node_cpus) < n:
        share = round(share - 0.01, 2)
    return max(0.01, share)


def shares(config: Config, cpus: float) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each participant's actor: resources.per_model's entry for its model,
    else the run's `cpus` and resources.num_gpus."""
    out = []
    for model in config.participant_models():
        share = model_share(config, model)
        out.append((float(share.get("num_cpus", cpus)), gpu_share(config, model)))
    return out


def uses_gpus(config: Config) -> bool:
    r = config.resources
    return r.num_gpus > 0 or any(s.get("num_gpus", 0) > 0 for s in (r.per_model or {}).values())


def _check_shares(config: Config, each: list[tuple[float, float]], cluster: dict[str, float]) -> None:
    """Per-model shares against the cluster's totals, naming the models that take the most."""
    for i, (kind, key) in enumerate((("CPU", "num_cpus"), ("GPU", "num_gpus"))):
        need, have = sum(share[i] for share in each), float(cluster.get(kind, 0))
        if need > have + 1e-9:
            by_model: dict[str, float] = {}
            for model, share in zip(config.participant_models(), each):
                by_model[model] = by_model.get(model, 0.0) + share[i]
            parts = ", ".join(f"{m} {v:g}" for m, v in sorted(by_model.items(), key=lambda kv: -kv[1]))
            raise ResourceError(
                f"The participants' {kind} shares (resources.per_model and resources.{key}) add up "
                f"to {need:g} {kind}s ({parts}); the Ray cluster has {have:g}. Lower the shares or "
                f"add {kind} nodes."
            )


def plan_resources(
    config: Config, cluster: dict[str, float], actors: int | None = None, node_cpus: list[float] | None = None
) -> tuple[float, float, int]:
    """CPUs, GPUs and torch threads for each participant actor, checked against the cluster
    (its total, and with `node_cpus`, what fits node by node). With resources.per_model the
    CPUs and GPUs are those of the participants without an entry; `shares` gives each one's."""
    n = actors or config.num_participants
    what = "actors" if actors else "participants"
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    gpus = config.resources.num_gpus
    if config.resources.per_model:
        cpus = config.resources.num_cpus or even_share(node_cpus or [total_cpus], n)
        _check_shares(config, shares(config, cpus), cluster)
        return cpus, gpus, participant_threads(config, total_cpus)
    if gpus * n > total_gpus + 1e-9:
        raise ResourceError(
            f"{n} {what} x {gpus} GPU need {gpus * n:g} GPUs; the Ray cluster has "
            f"{total_gpus:g}. Lower resources.num_gpus (e.g. {math.floor(total_gpus / n * 100) / 100 or 0:g}) "
            "or add GPU nodes."
        )
    cpus = config.resources.num_cpus
    if cpus is None:
        cpus = even_share(node_cpus or [total_cpus], n)
    elif cpus * n > total_cpus + 1e-9:
        raise ResourceError(
            f"{n} {what} x {cpus} CPU need {cpus * n:g} CPUs; the Ray cluster has "
            f"{total_cpus:g}. Lower resources.num_cpus or leave it unset to share evenly."
        )
    return cpus, gpus, participant_threads(config, total_cpus)


def concurrency_window(config: Config, cluster: dict[str, float], threads: int) -> int | None:
    """How many participants may compute at once: resources.max_concurrent, or on CPU-only
    runs with more participants than cores, the cores' worth (cores / torch threads). GPU
    runs are not windowed: kernels from many actors overlap on the device. The window
    decides how fast, never what is computed."""
    if config.resources.max_concurrent is not None:
        return config.resources.max_concurrent
    cpus = int(cluster.get("CPU", 0))
    if uses_gpus(config) or cpus == 0 or config.num_participants * threads <= cpus:
        return None
    return max(1, cpus // threads)


@dataclass
class Placement:
    """Where and with what each of `slots` actors runs. `group` is a placement group (ours,
    when `own`, or a Tune trial's) whose bundles `offset`, `offset + 1`, ... hold the actors."""

    cpus: float
    gpus: float
    threads: int
    slots: int
    group: Any = None
    own: bool = False
    offset: int = 0
    runtime_env: dict[str, Any] | None = None
    each: list[tuple[float, float]] | None = None
    """(CPUs, GPUs) of each slot where they differ (resources.per_model); else cpus, gpus."""

    @property
    def in_trial(self) -> bool:
        """Placed in a Ray Tune trial's group (not one of this run's own)."""
        return self.group is not None and not self.own

    def share(self, slot: int) -> tuple[float, float]:
        return self.each[slot] if self.each and slot >= 0 else (self.cpus, self.gpus)

    def strategy(self, slot: int) -> Any:
        """The scheduling strategy of actor `slot` (bundle 0 of a trial's group when `slot`
        is -1: the trial's own process, where the consensus actor goes)."""
        if self.group is None:
            return None
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = 0 if slot < 0 else slot + self.offset
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    def actor_options(self, slot: int) -> dict[str, Any]:
        cpus, gpus = self.share(slot)
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus or None, "max_restarts": 0}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        if self.group is not None:
            options["scheduling_strategy"] = self.strategy(slot)
        return options

    def nodes(self) -> list[str] | None:
        """The node of each actor's bundle."""
        if self.group is None:
            return None
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.group).get("bundles_to_node_id", {})
        return [table.get(k + self.offset) for k in range(self.slots)]

    def release(self) -> None:
        if self.group is not None and self.own:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        self.group = None


def beside_driver(ray: Any) -> Any:
    """The scheduling strategy of an actor that needs no resources and must live as long as
    the driver: on the driver's node (through Ray Client, the client server's). Not `soft`:
    Ray takes a node whose CPUs are all held as one without room, even for no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def shares_gpus(plan: Placement) -> bool:
    """Whether two or more of `plan`'s actors may share a GPU (a share below one)."""
    shares = [plan.share(slot)[1] for slot in range(plan.slots)]
    return plan.slots > 1 and any(0 < g < 1 for g in shares)


def _trial_group(config: Config, slots: int):
    """Inside a Ray Tune trial, the trial's placement group: bundle 0 is the trial's own
    process, bundles 1..n the participants' actors."""
    if config.resources.placement is not None:
        return None
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None and len(group.bundle_specs) < slots + 1:
        raise ResourceError(
            f"The Ray Tune trial's placement group has {len(group.bundle_specs)} bundles; this run "
            f"needs {slots + 1} (one for the trial, one per participant actor). Size it with "
            "fedmd_ray.tune.trial_resources(config)."
        )
    return group


def _reserve(strategy: str, each: list[tuple[float, float]], fixed: bool = False):
    """One bundle per actor, placed by `strategy`; refused clearly if it cannot fit. On a
    `fixed` cluster (the local Ray this run started: no autoscaler will add nodes) a strict
    strategy its nodes cannot hold is refused at once, not after PLACEMENT_TIMEOUT_SECONDS."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})} for cpus, gpus in each]
    if fixed:
        _check_strict(strategy, len(bundles), sum(1 for n in ray.nodes() if n.get("Alive")))
    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_SECONDS)
    if not ready:
        remove_placement_group(group)
        n, shown = len(bundles), bundles[0] if all(b == bundles[0] for b in bundles) else "their shares"
        raise ResourceError(
            f"Could not place {n} participants of {shown} with strategy {strategy} within "
            f"{PLACEMENT_TIMEOUT_SECONDS} s; the cluster has {ray.cluster_resources()}. "
            "Use PACK or SPREAD instead of STRICT_*, or fewer resources per participant."
        )
    return group


def _check_strict(strategy: str, bundles: int, nodes: int) -> None:
    """STRICT_SPREAD needs a node per bundle (STRICT_PACK's one node is the cluster's total,
    checked with the shares, on a Ray of one machine)."""
    if strategy == "STRICT_SPREAD" and nodes < bundles:
        raise ResourceError(
            f"resources.placement=STRICT_SPREAD puts each of {bundles} actors on a node of its own; "
            f"this Ray has {nodes} node{'s' if nodes != 1 else ''}. Use SPREAD or PACK, or fewer "
            "actors (resources.actors)."
        )


def place(config: Config, slots: int, pooled: bool, fixed: bool = False) -> Placement:
    """Resources and placement of `slots` actors: from the Tune trial's bundles when this
    runs inside a trial, else planned against the cluster (and reserved as a placement group
    with resources.placement; `fixed`: the cluster cannot grow)."""
    import ray

    group = _trial_group(config, slots)
    if group is not None:
        specs = group.bundle_specs[1 : slots + 1]
        each = [(float(b.get("CPU", 0)), float(b.get("GPU", 0))) for b in specs]
        cpus, gpus = each[0]
        threads = participant_threads(config, sum(c for c, _ in each))
        uneven = config.resources.per_model and len(set(each)) > 1
        return Placement(
            cpus, gpus, threads, slots, group, own=False, offset=1, each=each if uneven else None
        )
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    cpus, gpus, threads = plan_resources(
        config, ray.cluster_resources(), slots if pooled else None, node_cpus
    )
    each = shares(config, cpus) if config.resources.per_model else None
    strategy = config.resources.placement
    group = _reserve(strategy, each or [(cpus, gpus)] * slots, fixed) if strategy else None
    return Placement(cpus, gpus, threads, slots, group, own=group is not None, each=each)
