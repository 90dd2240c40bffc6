"""Shared fixtures for the fused-op micro-benchmarks (``bench/ops/bench_<op>.py``); see README.md here.

GPU only: every benchmark is skipped without CUDA (Triton's interpreter on a CPU tests correctness, not speed).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("op benchmarks need a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def cuda_bench(request, device):
    """``cuda_bench(fn, *args)``: pytest-benchmark timing of ``fn(*args)`` with the GPU synchronised after each
    call, so the figures are kernel time and not launch time. Warms up (compiles, autotunes) first."""
    pytest.importorskip("pytest_benchmark")
    benchmark = request.getfixturevalue("benchmark")

    def run(fn, *args, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            torch.cuda.synchronize(device)
            return out

        for _ in range(3):
            call()
        return benchmark.pedantic(call, rounds=50, iterations=1, warmup_rounds=2)

    return run
