"""NVIDIA MPS on the GPU nodes of a run whose actors share devices (resources.mps="auto").

Without MPS, the CUDA contexts of actors holding a tenth of a GPU each take turns on the
device; with it their kernels run side by side (docs/PERFORMANCE.md: ten paper CNNs at 0.1
GPU on an H100 went from 1.43x to 1.99x the sequential loop with the daemon started by
hand). A process becomes an MPS client when it first touches CUDA, if a control daemon
serves the default pipe directory then: the daemon must be up before the actors start, and
nothing inside them changes.

On each alive node with GPUs, a task of no CPU pinned there uses a daemon already running,
or starts one and checks that a fresh process can run a kernel through it. Where the tool is
missing, will not start, or the check fails, that node runs without MPS (placement.json and
the summary say why), and a daemon this run started there is stopped again. Daemons this run
started are stopped when it ends, except by a Ray Tune trial (other trials may be its
clients); a run that is killed leaves them running (`echo quit | nvidia-cuda-mps-control`
stops one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

CONTROL = "nvidia-cuda-mps-control"
CHECK = "import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); print(float(x.sum()))"
TIMEOUT_S = 180  # the check imports torch and creates a CUDA context


def start(ray: Any) -> dict[str, dict]:
    """MPS on every alive GPU node: node id -> {"mps": "on" | "unavailable", "started": bool,
    "why": ...}."""
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    return _on_each(ray, nodes, "start")


def stop(ray: Any, status: dict[str, dict]) -> None:
    """Stop the daemons this run started (best effort: the run's results are written)."""
    nodes = [node for node, s in status.items() if s.get("started")]
    try:
        _on_each(ray, nodes, "stop")
    except Exception:  # noqa: BLE001 - a node gone since is no reason to fail the end of a run
        pass


def _on_each(ray: Any, nodes: list[str], action: str) -> dict[str, dict]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(_here)
    refs = {
        node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            action
        )
        for node in nodes
    }
    out = {}
    for node, ref in refs.items():
        try:
            out[node] = ray.get(ref, timeout=TIMEOUT_S + 60)
        except Exception as exc:  # noqa: BLE001 - said in the status, the node runs without MPS
            out[node] = {"mps": "unavailable", "started": False, "why": f"{type(exc).__name__}: {exc}"}
    return out


def _here(action: str) -> dict:
    """Start (or stop) the daemon on this node; runs in a Ray task pinned to it."""
    tool = shutil.which(CONTROL)
    if tool is None:
        return {"mps": "unavailable", "started": False, "why": f"no {CONTROL} on this node's PATH"}
    # Ray hides the GPUs from a task that asked for none; the daemon and the check need them.
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}

    def control(*args: str, command: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [tool, *args], input=command, env=env, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess([tool, *args], 1, "", str(exc))

    if action == "stop":
        control(command="quit\n")
        return {"mps": "stopped", "started": False}
    if control(command="get_server_list\n").returncode == 0:
        return {"mps": "on", "started": False, "why": "a daemon was running already"}
    started = control("-d")
    if started.returncode != 0:
        if control(command="get_server_list\n").returncode == 0:
            # Another run on this node started one between the two calls: its actors and
            # ours are its clients alike, and it is that run's to stop.
            return {"mps": "on", "started": False, "why": "a daemon another run started at the same time"}
        return {"mps": "unavailable", "started": False, "why": f"{CONTROL} -d failed: {_last(started)}"}
    try:
        check = subprocess.run(
            [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        failed = _last(check) if check.returncode != 0 else None
    except subprocess.TimeoutExpired:
        failed = f"no answer in {TIMEOUT_S} s"
    if failed is not None:
        control(command="quit\n")
        return {
            "mps": "unavailable",
            "started": False,
            "why": f"a CUDA process could not run through it: {failed}",
        }
    return {"mps": "on", "started": True}


def _last(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"
