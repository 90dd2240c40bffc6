"""Multi-process runs on CPU (gloo) give the single-process output: CFG-parallel, Ulysses 2, ring 2 and
Ulysses 2 x ring 2 on the tiny FLUX and Wan pipelines (fp32, 40 dB PSNR), eager and compiled; a dead or
stuck worker fails the run clearly. Each spawn runs several layouts to keep process launches few."""

from __future__ import annotations

import json

import pytest

from diffc.cli.parallel import spawn
from diffc.parallel import ParallelError
from tests.parallel import workers
from tests.pipelines.conftest import WAN_VARIANTS, build_wan_pipeline

MIN_PSNR = 40.0
# one thread a rank; fused ops run their torch reference (Triton's interpreter is what other tests time)
WORKER_ENV = {"DIFFC_CPU_THREADS": "1", "TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def checkpoints(flux_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-parallel")
    build_wan_pipeline(WAN_VARIANTS["base"], root / "tok").save_pretrained(root / "ckpt", safe_serialization=True)
    return {"flux": str(flux_checkpoint("dev-tiny")), "wan": str(root / "ckpt")}


def _check(results: dict, expected: list[str]) -> None:
    assert sorted(results) == sorted(expected)
    for name, case in results.items():
        assert case["psnr"] >= MIN_PSNR, (name, case["psnr"])


def test_two_processes_cfg_ulysses_ring(checkpoints, tmp_path):
    layouts = [dict(world=2, ulysses=2), dict(world=2, ring=2), dict(world=2, cfg=2)]
    spawn(workers.pipeline_cases, (str(tmp_path), checkpoints, layouts, ["flux"]), 2, WORKER_ENV)
    results = json.loads((tmp_path / "pipelines.json").read_text())
    names = [f"{f}:{l}" for f in ("flux", "wan") for l in ("cfg1u2r1", "cfg1u1r2", "cfg2u1r1")]
    _check(results, names + ["flux:cfg1u2r1:compiled"])
    # the work was really spread: sequence layouts ran the USP attention, CFG-parallel split every batch
    for family, blocks in (("flux", 3), ("wan", 2 * 2)):  # wan: self + cross attention per block
        for layout in ("cfg1u2r1", "cfg1u1r2"):
            p = results[f"{family}:{layout}"]["parallel"]
            assert p["forwards"] == 2 and p["attention_calls"] == 2 * blocks, (family, layout, p)
        p = results[f"{family}:cfg2u1r1"]["parallel"]
        assert p["cfg_split"] == 2 and p["attention_calls"] == 0, (family, p)
    compiled = results["flux:cfg1u2r1:compiled"]["compiled"]
    assert compiled["compiled_calls"] == 2 and compiled["eager_fallbacks"] == 0, compiled
    assert "parallel (2 processes: cfg 1 x ulysses 2 x ring 1)" in results["flux:cfg1u2r1"]["layers"]


def test_four_processes_ulysses_times_ring(checkpoints, tmp_path):
    layouts = [dict(world=4, ulysses=2, ring=2), dict(world=4, cfg=2, ulysses=2)]
    spawn(workers.pipeline_cases, (str(tmp_path), checkpoints, layouts), 4, WORKER_ENV)
    results = json.loads((tmp_path / "pipelines.json").read_text())
    _check(results, [f"{f}:{l}" for f in ("flux", "wan") for l in ("cfg1u2r2", "cfg2u2r1")])


def test_stuck_worker_times_out_and_dead_worker_fails(tmp_path):
    with pytest.raises(ParallelError, match=r"worker rank 1 exited with code 3"):
        spawn(workers.exit_with, (3,), 2, WORKER_ENV)
    spawn(workers.die_or_wait, (str(tmp_path), 3.0), 2, WORKER_ENV)
    report = json.loads((tmp_path / "timeout.json").read_text())
    assert report["message"].startswith("ParallelError: test all-reduce: a collective with the other workers failed")
    assert report["s"] < 30, report


def test_ranks_diffc_errors_are_reported_once():
    with pytest.raises(ParallelError) as info:
        spawn(workers.report_and_fail, (["height: bad", "height: bad"],), 2, WORKER_ENV)
    assert str(info.value) == "height: bad"  # not once per rank, not "worker rank 0 exited with code 2"
    with pytest.raises(ParallelError) as info:
        spawn(workers.report_and_fail, (["a: one thing", "b: another"],), 2, WORKER_ENV)
    assert str(info.value) == "rank 0: a: one thing; rank 1: b: another"


def test_run_command_spawns_cpu_workers_and_rank_zero_writes(flux_checkpoint, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from tests.helpers import psnr_uint8

    root = Path(__file__).resolve().parents[2]
    base = [sys.executable, "-m", "diffc", "run", "--model", str(flux_checkpoint("dev-tiny")), "--prompt", "a red fox",
            "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--no-progress", "--seed", "7"]
    env = {**__import__("os").environ, **WORKER_ENV}
    one = subprocess.run([*base, "-o", str(tmp_path / "one.png")], cwd=root, capture_output=True, text=True, env=env)
    two = subprocess.run([*base, "-o", str(tmp_path / "two.png"), "--num-gpus", "2", "--ring-degree", "2"], cwd=root,
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("diffc: wrote") == 1  # rank 0 alone reports
    assert "starting 2 processes: cfg 1 x ulysses 1 x ring 2 on cpu" in two.stderr
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("one.png", "two.png"))
    assert psnr_uint8(a, b) >= MIN_PSNR
    bad = subprocess.run([*base, "--num-gpus", "2", "--ulysses-degree", "3"], cwd=root, capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "valid with 2" in bad.stderr
    # found by every rank after loading: one line under its flag, no worker exit codes, no warnings from torch
    late = subprocess.run([*base[:9], "41", *base[10:], "--num-gpus", "2"], cwd=root, capture_output=True, text=True,
                          env=env)
    lines = [line for line in late.stderr.splitlines() if "error" in line.lower() or "warn" in line.lower()]
    assert late.returncode == 2 and len(lines) == 1, late.stderr[-2000:]
    assert lines[0].startswith("diffc run: error: --height: FLUX needs a multiple of"), lines
    assert "leaked semaphore" not in two.stderr + late.stderr and "Terminating process" not in late.stderr


class _Ended:
    def __init__(self, exitcode):
        self.exitcode = exitcode


@pytest.mark.parametrize("exitcodes, root", [
    ((1, 3), 1),  # rank 0 raised ("Connection reset by peer") because rank 1 died: rank 1 is named, not rank 0
    ((1, None), 0), ((None, 1), 1), ((0, -9), 1), ((-15, 3), 1), ((-11, 1), 0), ((3, 1), 0), ((None, None), None), ((0, 0), None),
])
def test_the_rank_that_died_is_named_before_one_that_failed_through_it(exitcodes, root):
    """A CI run found spawn naming rank 0's gloo error instead of rank 1's exit when both had ended by the time the
    parent looked: a rank that died by itself (an exit code other than 1, or a signal) is the cause."""
    from diffc.cli.parallel import _root_cause

    assert _root_cause([_Ended(code) for code in exitcodes]) == root
