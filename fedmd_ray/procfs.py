"""Memory of processes as Linux reports it (/proc), for the pool's budget and the
benchmarks; elsewhere, what the resource module knows."""

from __future__ import annotations

import os


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A size line of /proc/PID/status, in bytes: VmRSS (all resident pages, shared
    libraries' included: torch's are ~0.7 GiB, shared by every process that maps them),
    RssAnon (the process's own heap), RssShmem (shared memory it has mapped in, such as
    the object store's pages), VmHWM (peak resident). None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def private_memory() -> int:
    """This process's anonymous resident memory in bytes (its heap: not shared libraries,
    not the object store's mapped pages); where /proc is missing, its peak resident size."""
    heap = status_bytes("RssAnon")
    if heap is not None:
        return heap
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def children_pss_bytes(parents: set[int]) -> int:
    """Proportional set size of every process whose parent is in `parents`: shared pages
    (torch's libraries, the mapped object store) are split among the processes that map
    them instead of counted in each."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent not in parents:
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total
