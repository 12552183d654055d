"""atomic_write: the target is replaced whole or not at all."""

import pytest

from nlgraph.io import atomic_write


def test_writes_bytes_and_callables(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"one")
    assert p.read_bytes() == b"one"
    atomic_write(p, lambda f: f.write(b"two"))
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_failure_keeps_the_old_content(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_missing_folder_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        atomic_write(tmp_path / "nope" / "f.bin", b"x")


def test_new_files_get_the_usual_mode(tmp_path):
    import os

    p = tmp_path / "f.bin"
    atomic_write(p, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
