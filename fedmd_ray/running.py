"""Which process is writing a run folder now. Two runs given the same --out at once would
write their rounds into one folder (the second sees no earlier results while the first is
still in transfer learning); a mark in the folder, naming the writer, lets the second say
so instead. The mark is gone when its run ends; one left by a killed run is stale (its
process is gone) and is taken over. Local folders only: no pid can be checked through an
object store, and on another host none can be checked either."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from fedmd_ray.errors import ConfigError
from fedmd_ray.storage import Storage

MARK = ".fedmd-writing"
"""In the run folder while a run writes there: {"pid", "host", "since"}."""


def check_free(storage: Storage) -> None:
    """Refuse a folder that another live run on this machine is writing to."""
    writer = _live_writer(storage)
    if writer is not None:
        raise ConfigError(
            f"Another run ({writer}) is writing to {storage} now; wait for it to end, or choose "
            f"another --out. (If no run is, delete {storage.location(MARK)}.)"
        )


def mark(storage: Storage) -> bool:
    """Mark `storage` as this process's to write (refused if another live run marked it
    first). True when a mark was made, to be removed by `unmark`."""
    if not storage.local:
        return False
    path = Path(storage.path(MARK))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        check_free(storage)  # a stale mark, or this process's own: taken over
        path.write_text(text)
        return True
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def unmark(storage: Storage) -> None:
    try:
        Path(storage.path(MARK)).unlink()
    except OSError:
        pass


def _live_writer(storage: Storage) -> str | None:
    if not storage.local:
        return None
    try:
        info = json.loads(Path(storage.path(MARK)).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or pid == os.getpid() or not _alive(pid):
        return None
    return f"process {pid}, since {info.get('since', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone, for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
