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
