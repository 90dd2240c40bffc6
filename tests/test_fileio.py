"""atomic_write: all or nothing."""

import pytest

from diffc.fileio import _umask, atomic_write


def test_success_replaces_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.png"
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"new")) == target
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # the usual mode, not mkstemp's 0600

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "fresh.png", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_an_os_failure_is_one_line_naming_the_path(tmp_path):
    import errno

    from diffc.errors import DiffcError, OutputError

    def disk_full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out.mp4"
    with pytest.raises(OutputError) as info:
        atomic_write(target, disk_full)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert isinstance(info.value, DiffcError) and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []
    missing = tmp_path / "no-such-dir" / "a.png"
    with pytest.raises(OutputError, match=f"cannot write {missing}: No such file or directory"):
        atomic_write(missing, lambda tmp: tmp.write_bytes(b"x"))


def test_atomic_write_streams_into_a_device_instead_of_replacing_it(tmp_path):
    """Writing to /dev/null (or a FIFO, /dev/stdout) must never replace the node with a regular file."""
    import os
    import stat as st
    from pathlib import Path

    from diffc.fileio import atomic_write

    before = os.stat("/dev/null")
    atomic_write("/dev/null", lambda p: p.write_bytes(b"x" * 10))
    after = os.stat("/dev/null")
    assert st.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert not list(Path("/dev").glob(".null.*"))  # no temporary file left beside it
