"""``diffc.gemv`` on a GPU at the adaptive norms' sizes (FLUX.1: 1 x 3072 -> 18,432 / 9216): against cuBLAS's
``F.linear(F.silu(x), W, b)``, with the fp8 tier's weights against their dequantized reference, every row count
the kernel takes, and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.ops.fp8 import quantize_weight
from diffc.ops.gemv import MAX_ROWS, gemv_ref
from diffc.ops.registry import COUNTERS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 3072, 18432), (1, 3072, 9216), (2, 3072, 18432), (MAX_ROWS, 1000, 77), (3, 4099, 1031)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_cublas(shape, dtype):
    rows, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
    COUNTERS.reset()
    torch.ops.diffc.gemv(x, w, None, b, "silu", out)
    assert COUNTERS.kernel_launches == 1 and COUNTERS.reference_fallbacks == 0
    assert not out.isnan().any()
    ref = gemv_ref(x.double(), w.double(), None, b.double(), "silu")  # the exact value, for both
    cublas = F.linear(F.silu(x), w, b)
    # float32 accumulation both ways: the error is the output's rounding, as cuBLAS's
    assert _rel(out, ref) <= 1.5 * _rel(cublas, ref) + 1e-6


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_fp8_weight(shape):
    rows, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    w8, scale = quantize_weight(w)
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    torch.ops.diffc.gemv(x, w8, scale, b, "silu", out)
    torch.testing.assert_close(out, gemv_ref(x, w8, scale, b, "silu"), rtol=1.6e-2, atol=1e-2)
    assert _rel(out, F.linear(F.silu(x), w, b)) < 0.03  # what the fp8 weight costs


def test_cuda_graph_replay_reads_new_inputs():
    x = torch.randn(1, 3072, device="cuda").bfloat16()
    w = (torch.randn(9216, 3072, device="cuda") * 0.02).bfloat16()
    b = torch.randn(9216, device="cuda").bfloat16()
    out = torch.empty(1, 9216, device="cuda", dtype=torch.bfloat16)
    torch.ops.diffc.gemv(x, w, None, b, "silu", out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.diffc.gemv(x, w, None, b, "silu", out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, F.linear(F.silu(x), w, b), rtol=1.6e-2, atol=1e-2)
