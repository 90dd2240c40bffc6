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


@pytest.mark.parametrize("rank_env", [False, True])
def test_ctrl_c_is_reported_once_not_by_every_rank(flux_checkpoint, tmp_path, capsys, monkeypatch, rank_env):
    """Ctrl-C reaches the whole process group: each rank of `--num-gpus N` printed 'interrupted' too (N + 1 lines);
    a rank spawned by diffc now leaves it to its parent."""
    from diffc.cli import parallel
    from diffc.cli.main import main
    from diffc.loader import pipeline as pipeline_loader

    def ctrl_c(*args, **kwargs):  # the key pressed while the model loads
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_loader, "load", ctrl_c)
    if rank_env:
        for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", parallel.WORKER_ENV: "1",
                            parallel.RANK_ERRORS_ENV: str(tmp_path)}.items():
            monkeypatch.setenv(name, value)
    code = main(["compile", "--model", str(flux_checkpoint("dev-tiny")), "--out", str(tmp_path / "a.diffc")])
    assert code == 130
    said = [line for line in capsys.readouterr().err.splitlines() if "interrupted" in line]
    assert said == ([] if rank_env else ["diffc compile: interrupted"])
