"""Multi-GPU runs on NCCL (needs 2+ CUDA GPUs): `diffc run --num-gpus 2` matches one GPU, eager, compiled and
with CUDA graphs capturing the collectives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import psnr_uint8

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
ROOT = Path(__file__).resolve().parents[2]


def _run(ckpt: Path, out: Path, *flags: str) -> dict:
    dump = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "diffc", "run", "--model", str(ckpt), "--prompt", "a red fox", "--seed", "3",
           "--height", "64", "--width", "64", "--steps", "2", "--dtype", "fp32", "--device", "cuda", "-o", str(out),
           "--perf-dump-path", str(dump), "--no-progress", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(dump.read_text())


@pytest.mark.parametrize("flags", [
    ("--num-gpus", "2", "--ulysses-degree", "2"),
    ("--num-gpus", "2", "--ring-degree", "2"),
    ("--num-gpus", "2", "--ulysses-degree", "2", "--compile"),
    ("--num-gpus", "2", "--ring-degree", "2", "--cuda-graphs", "on"),
])
def test_two_gpus_match_one(flux_checkpoint, tmp_path, flags):
    ckpt = flux_checkpoint("dev-tiny")
    _run(ckpt, tmp_path / "one.png", "--cuda-graphs", "off")
    dump = _run(ckpt, tmp_path / "two.png", *flags)
    assert dump["runtime"]["dit"]["transformer"]["parallel"]["backend"] == "nccl"
    if "on" in flags:
        assert dump["runtime"]["dit"]["transformer"]["cuda_graphs"].get("enabled", True) is not False
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("one.png", "two.png"))
    assert psnr_uint8(a, b) >= 40
