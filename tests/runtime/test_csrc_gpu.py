"""The CUDA C++ kernels of ``csrc/`` on a GPU, against the Triton kernels they replace and the torch references:
every dtype, odd row counts, strided rows, all-zero rows, CUDA graph replay, and the shapes they leave to Triton."""

from __future__ import annotations

import pytest
import torch

from diffc.ops import csrc
from diffc.ops.fp8 import FP8, quantize_rows_ref
from diffc.ops.gelu_tanh import gelu_tanh_ref
from diffc.ops.registry import COUNTERS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or csrc.unavailable(torch.device("cuda")) is not None,
                                reason="needs a CUDA GPU of sm_89+ with cuda-python (diffc[cuda])")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rows, width) of rows the CUDA kernels take (4096+ wide); production: FLUX.1 4608 x 15,360 / 4096 x 12,288,
# Wan2.1 32,760 x 5120 / 8960 / 13,824
SHAPES = [(1, 4096), (7, 4104), (33, 5120), (129, 8960), (3, 15360), (2, 32768)]


def _outs(rows: int, width: int):
    return torch.full((rows, width), float("nan")).to(FP8).cuda(), torch.full((rows, 1), float("nan")).cuda()


def _run(op, *args, csrc_on: bool):
    """The op's outputs and whether it ran the csrc kernel (quantize_rows_cat: the width of both parts)."""
    rows = args[0].shape[0]
    two_parts = op in (torch.ops.diffc.quantize_rows_cat, torch.ops.diffc.quantize_rows_cat_gelu)
    width = args[0].shape[-1] + (args[1].shape[-1] if two_parts else 0)
    out, scale = _outs(rows, width)
    COUNTERS.reset()
    if csrc_on:
        op(*args, out, scale)
    else:
        with csrc.disabled():
            op(*args, out, scale)
    torch.cuda.synchronize()
    return out, scale, COUNTERS.csrc_launches


def _randn(*shape, dtype, seed, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_rows_cuda_equals_triton_and_reference(shape, dtype):
    if dtype == torch.float32 and shape[1] == 32768:
        pytest.skip("a float32 row of 32,768 is longer than the largest instance: Triton's (test below)")
    wide = _randn(shape[0], shape[1] + 16, dtype=dtype, seed=shape[1])
    for x in (wide[:, : shape[1]].contiguous(), wide[:, 8 : 8 + shape[1]] if dtype != torch.float32 else wide[:, 4 : 4 + shape[1]]):
        q, s, launched = _run(torch.ops.diffc.quantize_rows, x, csrc_on=True)
        tq, ts, _ = _run(torch.ops.diffc.quantize_rows, x, csrc_on=False)
        assert launched == 1
        assert torch.equal(s, ts) and torch.equal(q.view(torch.uint8), tq.view(torch.uint8))
        rq, rs = quantize_rows_ref(x)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        assert float((q.float() != rq.float()).float().mean()) <= 1e-3  # x / scale in another rounding order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("widths", [(3072, 12288), (8, 4096), (4096, 8)], ids=str)
def test_quantize_rows_cat_cuda_equals_triton_and_its_single_form(widths, dtype):
    """FLUX.1's single block: the attention output (a strided slice here) and the MLP activation, one row scale."""
    ka, kb = widths
    a = _randn(37, 2 * ka, dtype=dtype, seed=ka)[:, ka:]
    b = _randn(37, kb, dtype=dtype, seed=kb, scale=0.5)
    q, s, launched = _run(torch.ops.diffc.quantize_rows_cat, a, b, csrc_on=True)
    tq, ts, _ = _run(torch.ops.diffc.quantize_rows_cat, a, b, csrc_on=False)
    sq, ss, _ = _run(torch.ops.diffc.quantize_rows, torch.cat([a, b], -1), csrc_on=True)
    assert launched == 1
    for other_q, other_s in ((tq, ts), (sq, ss)):
        assert torch.equal(s, other_s) and torch.equal(q.view(torch.uint8), other_q.view(torch.uint8))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_rows_cat_gelu_cuda_matches_triton_and_the_two_ops(dtype, bias):
    """FLUX.1's single block with its MLP's GELU folded in: CUDA against Triton and against gelu_tanh then cat."""
    a = _randn(37, 6144, dtype=dtype, seed=1)[:, 3072:]
    h = _randn(37, 12288, dtype=dtype, seed=2)
    b = _randn(12288, dtype=dtype, seed=3, scale=1.0) if bias else None
    q, s, launched = _run(torch.ops.diffc.quantize_rows_cat_gelu, a, h, b, csrc_on=True)
    tq, ts, _ = _run(torch.ops.diffc.quantize_rows_cat_gelu, a, h, b, csrc_on=False)
    g = torch.empty_like(h)
    torch.ops.diffc.gelu_tanh(h, b, g)
    gq, gs, _ = _run(torch.ops.diffc.quantize_rows_cat, a, g, csrc_on=True)
    assert launched == 1
    for other_q, other_s in ((tq, ts), (gq, gs)):  # the fast exp may round a GELU value differently
        torch.testing.assert_close(s, other_s, rtol=2 ** -7, atol=0)
        assert float((q.view(torch.uint8) != other_q.view(torch.uint8)).float().mean()) <= 2e-3


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_tanh_fp8_cuda_matches_triton_and_reference(shape, dtype, bias):
    if dtype == torch.float32 and shape[1] == 32768:
        pytest.skip("longer than the largest float32 instance")
    x = _randn(*shape, dtype=dtype, seed=shape[0] + shape[1])
    b = _randn(shape[1], dtype=dtype, seed=7, scale=1.0) if bias else None
    q, s, launched = _run(torch.ops.diffc.gelu_tanh_fp8, x, b, csrc_on=True)
    tq, ts, _ = _run(torch.ops.diffc.gelu_tanh_fp8, x, b, csrc_on=False)
    assert launched == 1
    torch.testing.assert_close(s, ts, rtol=2 ** -7, atol=0)  # one rounding of the row's largest value at most
    assert float((q.view(torch.uint8) != tq.view(torch.uint8)).float().mean()) <= 2e-3
    # the op adds the bias in float32 (eager rounds x + bias to x's dtype first): its reference does the same
    rq, rs = quantize_rows_ref(gelu_tanh_ref(x.float() if b is None else x.float() + b.float()).to(dtype))
    torch.testing.assert_close(s, rs, rtol=2 ** -7, atol=0)
    got, want = q.float() * s, rq.float() * rs
    assert bool(((got - want).abs() <= 0.13 * want.abs() + rs * 2 ** -8).all())  # one fp8 step: 2^-3 of a value


def test_zero_rows_get_the_floor_scale():
    x = torch.zeros(4, 4096, dtype=torch.bfloat16, device="cuda")
    for op, args in ((torch.ops.diffc.quantize_rows, (x,)), (torch.ops.diffc.gelu_tanh_fp8, (x, None))):
        q, s, launched = _run(op, *args, csrc_on=True)
        assert launched == 1 and torch.equal(s, torch.full_like(s, 1e-12 / 448)) and not q.float().any()


@pytest.mark.parametrize("what", ["short rows", "odd width", "misaligned", "float32 too long", "bias of another dtype"])
def test_what_the_cuda_kernels_do_not_cover_runs_on_triton(what):
    base = _randn(6, 4200, dtype=torch.bfloat16, seed=3)
    if what == "short rows":
        op, args = torch.ops.diffc.gelu_tanh_fp8, (base[:, :1536].contiguous(), None)
    elif what == "odd width":
        op, args = torch.ops.diffc.quantize_rows, (base[:, :4097].contiguous(),)
    elif what == "misaligned":
        op, args = torch.ops.diffc.quantize_rows, (base[:, 1:4097],)
    elif what == "float32 too long":
        op, args = torch.ops.diffc.quantize_rows, (_randn(2, 32768, dtype=torch.float32, seed=4),)
    else:
        op, args = torch.ops.diffc.gelu_tanh_fp8, (base[:, :4096].contiguous(), _randn(4096, dtype=torch.float32, seed=5))
    q, s, launched = _run(op, *args, csrc_on=True)
    tq, ts, _ = _run(op, *args, csrc_on=False)
    assert launched == 0 and torch.equal(s, ts) and torch.equal(q.view(torch.uint8), tq.view(torch.uint8))


def test_cuda_kernels_replay_in_a_cuda_graph():
    x = _randn(1000, 8960, dtype=torch.bfloat16, seed=9)
    b = _randn(8960, dtype=torch.bfloat16, seed=10)
    q1, s1 = _outs(1000, 8960)
    q2, s2 = _outs(1000, 8960)

    def step():
        torch.ops.diffc.gelu_tanh_fp8(x, b, q1, s1)
        torch.ops.diffc.quantize_rows(x, q2, s2)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    eager = [t.clone() for t in (q1, s1, q2, s2)]
    graph = torch.cuda.CUDAGraph()
    COUNTERS.reset()
    with torch.cuda.graph(graph):
        step()
    assert COUNTERS.csrc_launches == 2
    for t in (q1, q2):
        t.view(torch.uint8).fill_(0x7F)
    s1.fill_(float("nan"))
    s2.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)
               for a, b in zip((q1, s1, q2, s2), eager))
