"""What glibc's malloc does with memory torch frees: kept for the next batch while a call
computes, handed back to the system once the call is over. Nothing on other C libraries
(macOS, musl): their allocators' defaults stay."""

from __future__ import annotations

import ctypes
import functools

_KEEPING = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Make malloc keep freed memory for reuse instead of handing it back to the kernel.
    The paper CNNs' activation maps are tens of MiB a batch; above glibc's mmap threshold
    (at most 32 MiB) each one is a fresh mapping whose pages the kernel zeroes on first
    touch, then unmaps on free. Measured on one core, inference of cnn2:128,256 on 1024
    images in chunks of 128: 7.4 s with 2.0 M page faults and 2.8 s of kernel time by
    default, 4.3 s with 50 k faults and 0.06 s with both thresholds raised; the same peak
    memory. Once per process."""
    global _KEEPING
    if _KEEPING:
        return
    _KEEPING = True
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def give_back_freed_memory() -> None:
    """Hand the memory malloc keeps (above) back to the system. A process that will sit idle
    (a participant's actor waiting for its turn on a core) would otherwise hold its last
    call's peak: ten paper CNNs on ten actors of a 2-core, 24 GiB machine took 20 GiB of
    memory in all, until Ray's memory monitor stopped the run; given back after their
    calls, 10 GiB, and the run finished (docs/PERFORMANCE.md). The driver gives back what
    thousands of calls' bookkeeping left (dispatch.py)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
