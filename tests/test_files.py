"""Atomic writes: a reader sees the old file or the new one, never part of one."""

import pytest

from fedmd_ray.files import atomic_write


def test_a_write_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "new"


def test_a_write_that_fails_halfway_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def broken(p):
        p.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
