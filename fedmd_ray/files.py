"""Writing files so that a crash mid-write never leaves a half-written one behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one step:
    readers see the old file or the new one, never a part. The temporary name starts with a
    dot, which dataset readers (pyarrow, Spark) skip inside a dataset folder."""
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no part-file behind either
        raise
