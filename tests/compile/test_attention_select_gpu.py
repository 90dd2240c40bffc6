"""Attention selection on a GPU: candidates are timed replayed from a CUDA graph, as the runtime runs a compiled
DiT, so a kernel's Python launch cost does not count against it; a kernel that cannot be captured is rejected
and leaves the allocator usable.

Run with ``python -m pytest tests/compile/test_attention_select_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from diffc.compile.attention_select import BACKENDS, AttentionBackend, AttentionShape, select_attention_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = AttentionShape(1, 8, 1024, 1024, 64)  # a short kernel (tens of microseconds), where launch cost shows
HOST_DELAY_S = 0.002


def _slow_launch(q, k, v, scale):
    time.sleep(HOST_DELAY_S)  # host work before the launch: a graph replay skips it
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _reads_back(q, k, v, scale):
    if float(q.abs().amax()) < 0:  # a device-to-host read: not allowed while capturing
        raise AssertionError
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def test_host_launch_cost_is_not_timed_and_uncapturable_kernels_are_rejected():
    table = {**BACKENDS, "slow_launch": AttentionBackend("slow_launch", "cuda", adapter=_slow_launch),
             "reads_back": AttentionBackend("reads_back", "cuda", adapter=_reads_back)}
    choice = select_attention_backend([SHAPE], "cuda", torch.bfloat16, ["reads_back", "sdpa", "slow_launch"],
                                      backends=table, warmup=2, iters=10)
    results = choice.shapes[0].candidates
    assert results["sdpa"].status == "ok" and results["slow_launch"].status == "ok"
    # the same kernel: equal within noise, and far below the 2 ms a plainly timed call would add
    assert results["slow_launch"].median_ms < results["sdpa"].median_ms * 1.5 + 0.05 < HOST_DELAY_S * 1e3
    assert results["reads_back"].status == "error" and "captur" in results["reads_back"].reason.lower()
    torch.cuda.empty_cache()  # the failed capture was undone: the allocator is not left mid-capture
    x = torch.randn(4, 4, device="cuda")
    assert torch.isfinite(x @ x).all()
