"""Where a run's results and checkpoints go: a local path or a URI (s3://, gs://, abfs://,
hdfs://, file://), through `pyarrow.fs`, as Ray Train and Tune take their `storage_path`.

Object stores are reached with their usual configuration: for S3, the AWS credential
variables (or an instance role) and AWS_ENDPOINT_URL for an S3-compatible server, which
`pyarrow.fs.FileSystem.from_uri` reads. Participant actors that write their states there
need the same wherever they run (an instance role, or resources.runtime_env's env_vars).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from fedmd_ray.errors import ConfigError, StorageError
from fedmd_ray.files import atomic_write

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


class Storage:
    """A folder on a filesystem: `path(...)` names things in it for pyarrow, the other
    methods read and write them. Writes are whole-object (an object store's put) or, on a
    local disk, a temporary file renamed into place: a reader sees the old or the new."""

    def __init__(self, location: str | Path):
        import pyarrow.fs as pafs

        text = str(location).strip()
        if is_uri(text):
            scheme = text.split("://", 1)[0].lower()
            if scheme not in SCHEMES:
                raise ConfigError(
                    f"'{text}': unknown storage scheme '{scheme}://'; use a local path or one of "
                    f"{', '.join(s + '://' for s in SCHEMES)}."
                )
            try:
                fs, root = pafs.FileSystem.from_uri(text)
            except Exception as exc:  # pyarrow raises its own kinds per filesystem
                raise ConfigError(f"'{text}' cannot be opened as storage: {exc}") from None
            self.uri = text.rstrip("/")
        else:
            fs, root = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            self.uri = root
        self.fs, self.root = fs, root.rstrip("/") or "/"

    @classmethod
    def of(cls, location: str | Path | Storage) -> Storage:
        return location if isinstance(location, Storage) else cls(location)

    @property
    def local(self) -> bool:
        """On this machine's disk (which other nodes of a cluster may not see)."""
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def location(self, *parts: str) -> str:
        """`parts` as a location another process opens with Storage(...)."""
        return posixpath.join(self.uri, *parts) if parts else self.uri

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------ reading

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def read_json(self, *parts: str) -> Any:
        """A JSON file's value; None when it is absent or cannot be read or parsed (for
        files that only add detail: a damaged one is no reason to stop)."""
        try:
            return json.loads(self.read_text(*parts)) if self.exists(*parts) else None
        except (OSError, ValueError):
            return None

    def names(self, *parts: str) -> list[str]:
        """The names directly inside a folder ([] when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.is_dir(*parts):
            return []
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    # ------------------------------------------------------------ writing

    def makedirs(self, *parts: str) -> None:
        try:
            self.fs.create_dir(self.path(*parts), recursive=True)
        except OSError as exc:
            raise self._unwritable(posixpath.join(*parts), exc) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `data` to `name` (a path inside this folder) whole."""
        try:
            if self.local:
                target = Path(self.path(name))
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, lambda p: p.write_bytes(data))
                return
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
        except OSError as exc:
            raise self._unwritable(name, exc) from None

    def _unwritable(self, name: str, exc: OSError) -> StorageError:
        why = {
            errno.ENOSPC: "the disk is full: free space there",
            errno.EDQUOT: "the disk quota is used up: free space there",
            errno.EROFS: "the filesystem became read-only",
            errno.EACCES: "permission denied",
        }.get(exc.errno, str(exc.strerror or exc))
        return StorageError(
            f"Could not write {self.location(name)} ({why}); what was written there before stays whole."
        )

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def delete(self, *parts: str) -> None:
        """A file or a folder, if it is there."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    def check_writable(self) -> None:
        """Refuse, in one line, a place a run cannot write its results to (an existing file,
        a read-only or missing place), before any work; leaves nothing behind."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ConfigError(f"--out {self.uri} is a file; name a folder for the run's results.")
        probe = f".fedmd-probe-{os.getpid()}"
        if not self.local:
            try:
                self.write_bytes(probe, b"")
                self.delete(probe)
            except Exception as exc:
                raise ConfigError(f"--out {self.uri} cannot be written to: {exc}") from None
            return
        # Make the folder and a file in it, then take away what this made: the only sure way
        # to know (root may write where permissions say no, and /proc refuses everything).
        made, folder = [], Path(self.root)
        while not folder.exists():
            made.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise ConfigError(f"--out {self.uri}: {folder} is a file, so no folder can be made there.")
        try:
            for new in reversed(made):
                new.mkdir()
            (Path(self.root) / probe).write_bytes(b"")
            (Path(self.root) / probe).unlink()
        except OSError as exc:
            raise ConfigError(
                f"--out {self.uri} cannot be written to ({exc.strerror or exc}); choose a folder you can "
                "write, e.g. --out runs/NAME."
            ) from None
        finally:
            for new in made:
                try:
                    new.rmdir()
                except OSError:
                    pass
