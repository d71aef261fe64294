"""Simulated failures (config `faults`), to try what a long run must survive: a participant
that raises, whose process dies, or that is late.

    "INDEX:PHASE:ROUND"          participant INDEX raises in PHASE of round ROUND
    "INDEX:PHASE:ROUND:exit"     its process dies there (as if killed)
    "INDEX:PHASE:ROUND:sleepS"   it is S seconds late there (a straggler)
    "INDEX:PHASE:ROUND:memoryG"  it takes G more GiB there and holds them for a minute (for
                                 Ray's memory monitor to end it, as it would a model too big)

A participant restored after a crash does not fail again: a crash is a one-off.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass

from fedmd_ray.errors import ConfigError
from fedmd_ray.phases import FAULT_PHASES


@dataclass(frozen=True)
class Fault:
    participant: int
    phase: str
    round: int
    mode: str = "raise"
    """'raise', 'exit', 'sleepSECONDS' or 'memoryGIB'."""


def parse_fault(text: str, participants: int) -> Fault:
    """'2:digest:3[:exit|:sleep5]' -> Fault(2, 'digest', 3, 'raise' | 'exit' | 'sleep5')."""
    parts = text.split(":")
    try:
        index, phase, round_ = int(parts[0]), parts[1], int(parts[2])
        mode = parts[3] if len(parts) > 3 else "raise"
    except (IndexError, ValueError):
        raise ConfigError(
            f"Fault '{text}' must look like INDEX:PHASE:ROUND[:exit|:sleepSECONDS|:memoryGIB], e.g. 1:digest:2."
        ) from None
    if (
        not 0 <= index < participants
        or phase not in FAULT_PHASES
        or not (mode in ("raise", "exit") or re.fullmatch(r"(sleep|memory)\d+(\.\d+)?", mode))
        or len(parts) > 4
    ):
        raise ConfigError(
            f"Fault '{text}': index must be 0..{participants - 1}, phase one of "
            f"{', '.join(FAULT_PHASES)}, and the mode 'raise', 'exit', 'sleepSECONDS' or 'memoryGIB'."
        )
    return Fault(index, phase, round_, mode)


def fire(faults: tuple[Fault, ...], phase: str, round_: int = 0) -> None:
    """Make the simulated faults planned for (`phase`, `round_`) happen."""
    for fault in faults:
        if (fault.phase, fault.round) != (phase, round_):
            continue
        if fault.mode == "exit":
            # Said first: on the local backend this process is the run's own, which then ends
            # with no other word (its checkpoint remains for --resume).
            print(
                f"simulated fault: the process of participant {fault.participant} dies in {phase} "
                f"of round {round_} (faults: '{fault.participant}:{phase}:{round_}:exit')",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # a crash, as if killed: no exception, no cleanup
        if fault.mode.startswith("sleep"):
            time.sleep(float(fault.mode[len("sleep") :]))  # a straggler
            continue
        if fault.mode.startswith("memory"):
            _hold_memory(float(fault.mode[len("memory") :]))
            continue
        raise RuntimeError(f"simulated fault in {phase} of round {round_}")


def _hold_memory(gib: float, seconds: float = 60.0) -> None:
    """Take `gib` GiB (written, so the pages are really held) for up to `seconds`."""
    held = bytearray(int(gib * 2**30))
    for start in range(0, len(held), 4096):
        held[start] = 1
    time.sleep(seconds)
    del held
