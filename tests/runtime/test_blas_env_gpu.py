"""On a GPU: with diffc imported first, a DiT's bias GEMM launches no memset (cuBLASLt runs without a workspace:
diffc/blas_env.py). Each case runs in a fresh process, since cuBLAS reads the variable once (skipped without CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# argv[1]: "diffc" imports diffc first (its default applies), "plain" does not (cuBLASLt keeps its workspace).
# Prints the memsets seen (the runtime call and the GPU activity both count) and the GEMM's error.
SCRIPT = """
import sys
if sys.argv[1] == "diffc":
    import diffc
import torch
from torch.profiler import ProfilerActivity, profile
x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16) / 50
b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
ref = (x.float() @ w.float().t() + b.float())
for _ in range(2):
    y = torch.nn.functional.linear(x, w, b)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    y = torch.nn.functional.linear(x, w, b)
    torch.cuda.synchronize()
err = float((y.float() - ref).norm() / ref.norm())
print(sum("memset" in e.name.lower() for e in p.events()), err)
"""


def _memsets(mode: str) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if k != "CUBLASLT_WORKSPACE_SIZE"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    memsets, err = out.stdout.split()[-2:]
    return int(memsets), float(err)


def test_a_bias_gemm_launches_no_memset_after_importing_diffc():
    plain, _ = _memsets("plain")
    if plain == 0:
        pytest.skip("this cuBLAS launches no memset before a bias GEMM even with its workspace: nothing to remove")
    memsets, err = _memsets("diffc")
    assert memsets == 0 and err < 1e-2
