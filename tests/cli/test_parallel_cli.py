"""``--num-gpus`` launching (diffc/cli/parallel.py): what the parent does when it is stopped itself."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from diffc.cli.main import Terminated, _terminated
from diffc.cli.parallel import spawn


def write_after(folder: str, seconds: float) -> int:
    """A rank: its pid now, a 'done' file after ``seconds`` (as rank 0 writes the output when it finishes)."""
    rank = os.environ["RANK"]
    (Path(folder) / f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    (Path(folder) / f"{rank}.done").write_text("written")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_terminated_parent_stops_its_ranks_before_they_write(tmp_path):
    """Found by an audit: SIGTERM to `diffc run --num-gpus 2` printed 'terminated', then waited for the ranks (at
    multiprocessing's exit) and rank 0 wrote the output anyway."""
    previous = signal.signal(signal.SIGTERM, _terminated)  # as diffc's main installs it

    def terminate_once_started():
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    try:
        with pytest.raises(Terminated):
            spawn(write_after, (str(tmp_path), 20.0), 2, {"TRITON_INTERPRET": "0"})
    finally:
        signal.signal(signal.SIGTERM, previous)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    assert list(tmp_path.glob("*.done")) == []
