"""On a GPU: with diffc imported first, a DiT's bias GEMM launches no memset (cuBLASLt runs without a workspace:
diffc/blas_env.py). Each case runs in a fresh process, since torch reads the variable once (skipped without CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCRIPT = """
import diffc, torch
from torch.profiler import ProfilerActivity, profile
x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16) / 50
b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
ref = (x.float() @ w.float().t() + b.float())
for _ in range(2):
    y = torch.nn.functional.linear(x, w, b)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU]) as p:
    y = torch.nn.functional.linear(x, w, b)
    torch.cuda.synchronize()
err = float((y.float() - ref).norm() / ref.norm())
print(sum("Memset" in e.name for e in p.events()), err)
"""


def test_a_bias_gemm_launches_no_memset_after_importing_diffc():
    env = {k: v for k, v in os.environ.items() if k != "CUBLASLT_WORKSPACE_SIZE"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    memsets, err = out.stdout.split()
    assert int(memsets) == 0 and float(err) < 1e-2
