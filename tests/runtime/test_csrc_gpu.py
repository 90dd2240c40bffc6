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


# ------------------------------------------------------------------------------------------------------------
# csrc/adaln_rows.cu: adaln_modulate(_fp8) and gated_residual_adaln(_fp8)
# ------------------------------------------------------------------------------------------------------------

def _adaln_args(batch: int, seq: int, width: int, dtype, modulation: str, per_token: bool, seed: int):
    """x, y, gate, scale, shift, biases for one case. modulation: "act" (the activations' dtype: FLUX's rounded
    math), "table" (that plus float32 bias rows: Wan's modulation table), "f32" (float32 modulation)."""
    mod_dtype = torch.float32 if modulation == "f32" else dtype
    rows = seq if per_token else 1
    x = _randn(batch, seq, width, dtype=dtype, seed=seed, scale=3.0)
    y = _randn(batch, seq, width, dtype=dtype, seed=seed + 1, scale=1.0)
    gate, scale, shift = (_randn(batch, rows, width, dtype=mod_dtype, seed=seed + 2 + i, scale=0.3) for i in range(3))
    biases = {}
    if modulation == "table":
        biases = {k: _randn(width, dtype=torch.float32, seed=seed + 5 + i, scale=0.3)
                  for i, k in enumerate(("scale_bias", "shift_bias", "gate_bias"))}
    return x, y, gate, scale, shift, biases


def _adaln_call(form: str, x, y, gate, scale, shift, biases):
    """Run one op form into fresh NaN-filled outputs -> (outputs, csrc launches)."""
    mod = {k: v for k, v in biases.items() if k != "gate_bias"}
    rows = x.shape[0] * x.shape[1]
    res, out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    q, qs = _outs(rows, x.shape[-1])
    q = q.view(x.shape)
    d = torch.ops.diffc
    COUNTERS.reset()
    if form == "adaln":
        d.adaln_modulate(x, scale, shift, 1e-6, out, **mod)
        outs = (out,)
    elif form == "adaln_fp8":
        d.adaln_modulate_fp8(x, scale, shift, 1e-6, q, qs, **mod)
        outs = (q, qs)
    elif form == "pair":
        d.gated_residual_adaln(x, y, gate, scale, shift, 1e-6, res, out, **biases)
        outs = (res, out)
    else:
        d.gated_residual_adaln_fp8(x, y, gate, scale, shift, 1e-6, res, q, qs, **biases)
        outs = (res, q, qs)
    torch.cuda.synchronize()
    return outs, COUNTERS.csrc_launches


def _assert_adaln_outputs_agree(got, want):
    for a, b in zip(got, want):
        if a.dtype == FP8:
            assert float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean()) <= 2e-3
        elif a.dtype == torch.float32:  # fp8 row scales
            torch.testing.assert_close(a, b, rtol=2 ** -7, atol=0)
        else:  # the residual is exact; the modulated norm differs by the sums' order: one last place at most
            torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("form", ["adaln", "adaln_fp8", "pair", "pair_fp8"])
@pytest.mark.parametrize("modulation", ["act", "table", "f32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("width", [1536, 3072, 5120])
def test_adaln_rows_cuda_matches_triton_and_reference(form, modulation, dtype, width, monkeypatch):
    from diffc.ops import adaln_modulate
    from diffc.ops.adaln_modulate import adaln_modulate_ref, biased
    from diffc.ops.fp8 import quantize_rows_ref

    monkeypatch.setattr(adaln_modulate, "CSRC_MIN_VECTORS", 0)  # every width takes the CUDA kernel
    args = _adaln_args(2, 37, width, dtype, modulation, per_token=False, seed=width)
    got, launched = _adaln_call(form, *args)
    with csrc.disabled():
        want, _ = _adaln_call(form, *args)
    assert launched == 1
    _assert_adaln_outputs_agree(got, want)
    x, y, gate, scale, shift, biases = args
    if form.startswith("pair"):  # the residual as eager computes it, exactly
        product = biased(gate, biases.get("gate_bias")) * y.float()
        if modulation == "act":
            product = (gate * y).float()
        assert torch.equal(got[0], (x.float() + product).to(dtype))
        x = got[0]
    ref = adaln_modulate_ref(x, biased(scale, biases.get("scale_bias")), biased(shift, biases.get("shift_bias")))
    if form.endswith("fp8"):
        rq, rs = quantize_rows_ref(ref.reshape(-1, width))
        torch.testing.assert_close(got[-1], rs, rtol=2 ** -6, atol=0)
        value, want_value = got[-2].float().reshape(-1, width) * got[-1], rq.float() * rs
        assert bool(((value - want_value).abs() <= 0.13 * want_value.abs() + rs * 2 ** -8).all())
    else:
        torch.testing.assert_close(got[-1], ref, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("form", ["adaln_fp8", "pair"])
def test_adaln_rows_cuda_per_token_modulation_and_strided_rows(form, monkeypatch):
    """Per-token modulation (B, S, C) and x a strided view (rows of a wider buffer) take the CUDA kernel too."""
    from diffc.ops import adaln_modulate

    monkeypatch.setattr(adaln_modulate, "CSRC_MIN_VECTORS", 0)
    x, y, gate, scale, shift, biases = _adaln_args(2, 19, 3072, torch.bfloat16, "table", per_token=True, seed=11)
    wide = _randn(2, 19, 3072 + 64, dtype=torch.bfloat16, seed=12)
    wide[..., :3072] = x
    x = wide[..., :3072]
    assert not x.is_contiguous()
    got, launched = _adaln_call(form, x, y, gate, scale, shift, biases)
    with csrc.disabled():
        want, _ = _adaln_call(form, x, y, gate, scale, shift, biases)
    assert launched == 1
    _assert_adaln_outputs_agree(got, want)


@pytest.mark.parametrize("what", ["float32 rows", "gate of another dtype", "misaligned rows", "narrow rows"])
def test_adaln_rows_the_cuda_kernel_leaves_to_triton(what, monkeypatch):
    from diffc.ops import adaln_modulate

    monkeypatch.setattr(adaln_modulate, "CSRC_MIN_VECTORS", None if what == "narrow rows" else 0)
    dtype = torch.float32 if what == "float32 rows" else torch.bfloat16
    x, y, gate, scale, shift, biases = _adaln_args(1, 9, 1536, dtype, "act", per_token=False, seed=21)
    if what == "gate of another dtype":
        gate = gate.float()
    if what == "misaligned rows":
        x = _randn(1, 9, 1540, dtype=dtype, seed=22)[..., 4:]
    form = "pair"
    got, launched = _adaln_call(form, x, y, gate, scale, shift, biases)
    with csrc.disabled():
        want, _ = _adaln_call(form, x, y, gate, scale, shift, biases)
    assert launched == 0
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("form", ["pair", "pair_fp8"])
def test_adaln_rows_triton_rounds_where_eager_rounds(form):
    """FLUX's bf16 math: the product gate * y and the modulation are rounded to bf16 as eager rounds them. With
    FMA contraction the compiled Triton kernel skipped the product's rounding (7.6% of an H200's residuals were
    one step off); the launches turn contraction off where a rounding sits between a multiply and an add."""
    from diffc.ops.gated_residual import gated_residual_ref

    x, y, gate, scale, shift, biases = _adaln_args(1, 256, 3072, torch.bfloat16, "act", per_token=False, seed=31)
    with csrc.disabled():
        got, launched = _adaln_call(form, x, y, gate, scale, shift, biases)
    assert launched == 0
    assert torch.equal(got[0], gated_residual_ref(x, y, gate))
    out = torch.full_like(x, float("nan"))
    with csrc.disabled():
        torch.ops.diffc.gated_residual(x, y, gate, out)
    assert torch.equal(out, gated_residual_ref(x, y, gate))


@pytest.mark.parametrize("rows,cuda", [(16384, True), (4096, False)])
def test_adaln_rows_fp8_forms_of_many_narrow_rows_take_the_cuda_kernel(rows, cuda):
    """1536-wide rows: the fp8 forms run the CUDA kernel from CSRC_FP8_MIN_ROWS rows (Wan2.1-1.3B's 32,760), the bf16
    forms stay with Triton."""
    x, y, gate, scale, shift, biases = _adaln_args(1, rows, 1536, torch.bfloat16, "table", per_token=False, seed=41)
    (_, launched_fp8), (_, launched_bf16) = (_adaln_call(form, x, y, gate, scale, shift, biases)
                                             for form in ("pair_fp8", "pair"))
    assert launched_fp8 == int(cuda) and launched_bf16 == 0


def test_adaln_rows_with_no_rows_launch_nothing():
    x = torch.zeros(2, 0, 5120, dtype=torch.bfloat16, device="cuda")
    scale = torch.zeros(2, 1, 5120, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    COUNTERS.reset()
    torch.ops.diffc.adaln_modulate(x, scale, scale, 1e-6, out)
    torch.cuda.synchronize()
    assert COUNTERS.csrc_launches == 0


# ------------------------------------------------------------------------------------------------------------
# csrc/gemv.cu: diffc.gemv over one row (the adaLN projections of the conditioning)
# ------------------------------------------------------------------------------------------------------------

# (in_features, out_features): FLUX.1's norm1.linear 3072 -> 18432 and single-block 3072 -> 9216; N not a
# multiple of a block's channels; K not a multiple of the vectors a warp has in flight; the longest row staged
GEMV_SHAPES = [(3072, 18432), (3072, 9216), (1536, 37), (4112, 1000), (64, 5), (8192, 300)]


def _gemv(x, w, s, b, act, *, csrc_on: bool):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device="cuda")
    COUNTERS.reset()
    if csrc_on:
        torch.ops.diffc.gemv(x, w, s, b, act, out)
    else:
        with csrc.disabled():
            torch.ops.diffc.gemv(x, w, s, b, act, out)
    torch.cuda.synchronize()
    return out, COUNTERS.csrc_launches


@pytest.mark.parametrize("act", ["silu", "none"])
@pytest.mark.parametrize("weights", ["same dtype", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=str)
def test_gemv_cuda_matches_triton_and_reference(shape, dtype, weights, act, monkeypatch):
    from diffc.ops import gemv as gemv_mod
    from diffc.ops.fp8 import quantize_weight
    from diffc.ops.gemv import gemv_ref

    monkeypatch.setattr(gemv_mod, "CSRC_WEIGHT_DTYPES", (FP8, dtype))  # the instances bf16 weights leave unused
    monkeypatch.setattr(gemv_mod, "CSRC_GPUS", ("",))  # whatever GPU runs the test

    k, n = shape
    x = _randn(1, k, dtype=dtype, seed=k)
    w = _randn(n, k, dtype=dtype, seed=n, scale=0.05)
    b = _randn(n, dtype=dtype, seed=3, scale=1.0) if act == "silu" else None
    s = None
    if weights == "fp8":  # the fp8 tier's copy: float8_e4m3 with a float32 scale per output channel
        w, s = quantize_weight(w)
    got, launched = _gemv(x, w, s, b, act, csrc_on=True)
    triton_out, triton_launched = _gemv(x, w, s, b, act, csrc_on=False)
    assert launched == 1 and triton_launched == 0
    want = gemv_ref(x, w, s, b, act)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.float().abs().max().item() + 1e-6
    for out in (got, triton_out):  # float32 sums in different orders: one rounding of the output apart
        assert torch.isfinite(out).all()
        assert (out.float() - want.float()).abs().max().item() <= tol * scale


def test_gemv_the_cuda_kernel_leaves_to_triton(monkeypatch):
    from diffc.ops import gemv as gemv_mod
    from diffc.ops.fp8 import quantize_weight
    from diffc.ops.gemv import CSRC_MAX_K

    monkeypatch.setattr(gemv_mod, "CSRC_GPUS", ("",))  # every GPU: what is left to Triton is for other reasons

    x = _randn(2, 256, dtype=torch.bfloat16, seed=1)
    w = _randn(64, 256, dtype=torch.bfloat16, seed=2)
    wide = _randn(1, CSRC_MAX_K + 16, dtype=torch.bfloat16, seed=3)
    wide_w = quantize_weight(_randn(16, CSRC_MAX_K + 16, dtype=torch.bfloat16, seed=4))
    odd_w = quantize_weight(_randn(16, 272, dtype=torch.bfloat16, seed=5))
    pair = torch.cat([odd_w[0].view(torch.uint8)] * 2, 1)
    odd_w = (pair[:, 8:264].view(FP8), odd_w[1])  # rows 8 bytes off the 16-byte grid
    cases = {"two rows": (x, (quantize_weight(w))), "bf16 weights": (x[:1], (w, None)), "K too long": (wide, wide_w),
             "misaligned weight rows": (x[:1], odd_w)}
    for what, (xx, (ww, ss)) in cases.items():
        got, launched = _gemv(xx, ww, ss, None, "silu", csrc_on=True)
        want, _ = _gemv(xx, ww, ss, None, "silu", csrc_on=False)
        assert launched == 0 and torch.equal(got, want), what
    served = (x[:1], quantize_weight(w))
    assert _gemv(served[0], *served[1], None, "silu", csrc_on=True)[1] == 1
    monkeypatch.setattr(gemv_mod, "CSRC_GPUS", ("a GPU it was not measured on",))
    assert _gemv(served[0], *served[1], None, "silu", csrc_on=True)[1] == 0


def test_gemv_cuda_kernel_serves_the_gpus_it_measured_faster_on():
    from diffc.ops import gemv as gemv_mod

    name = torch.cuda.get_device_name()
    assert gemv_mod._measured_faster_on(torch.device("cuda")) == any(n in name for n in gemv_mod.CSRC_GPUS)
    assert not gemv_mod._measured_faster_on(torch.device("cpu"))


def test_gemv_cuda_kernel_replays_in_a_cuda_graph(monkeypatch):
    from diffc.ops import gemv as gemv_mod
    from diffc.ops.fp8 import quantize_weight

    monkeypatch.setattr(gemv_mod, "CSRC_GPUS", ("",))

    x = _randn(1, 3072, dtype=torch.bfloat16, seed=1)
    w, s = quantize_weight(_randn(9216, 3072, dtype=torch.bfloat16, seed=2, scale=0.05))
    b = _randn(9216, dtype=torch.bfloat16, seed=3)
    out = torch.empty(1, 9216, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.diffc.gemv(x, w, s, b, "silu", out)
    torch.cuda.current_stream().wait_stream(stream)
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    COUNTERS.reset()
    with torch.cuda.graph(graph):
        torch.ops.diffc.gemv(x, w, s, b, "silu", out)
    assert COUNTERS.csrc_launches == 1
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
