"""A video that cannot be written (a full disk while ffmpeg writes it) is a one-line error naming the file,
and no truncated MP4 stays behind (issue 12 sections 4 and 5)."""

from __future__ import annotations

import pytest

from diffc.cli.main import main
from tests.full_disk import full_disk_ffmpeg


def test_run_with_a_full_disk_writes_no_truncated_video(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    full_disk_ffmpeg(monkeypatch)
    argv = ["run", "--task", "t2v", "--prompt", "a fox", "-o", str(out / "fox.mp4"), "--height", "32", "--width", "32",
            "--num-frames", "5", "--steps", "1", "--max-sequence-length", "8", "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines()[-1].startswith(f"diffc run: error: cannot write {out / 'fox.mp4'}: ffmpeg failed"), err
    assert list(out.iterdir()) == []
