"""The fp8 variants of the fused producers (rowwise float8_e4m3 + scales in the same kernel) and the fp8
GEMM they feed, against the torch references: the bf16 op's reference quantized row by row."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import InvalidArgumentError
from diffc.ops.adaln_modulate import adaln_modulate_ref
from diffc.ops.fp8 import (FP8, FP8_MAX, dequantize_rows, fp8_linear_ref, quantize_rows_ref, quantize_weight)
from diffc.ops.gated_residual import gated_residual_adaln_ref
from diffc.ops.gelu_tanh import gelu_tanh_ref
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, randn
from tests.ops.test_adaln_modulate import MODULATIONS, modulation

FP8_ROUNDS_TO_NEAREST = round_interpreter_fp8_to_nearest()
EPS = 1e-6
# (batch, seq, dim); production: FLUX.1 dim 3072 / FFN 12288 over 4,096 + 512 tokens, Wan2.1-1.3B 1536 / 8960
SHAPES = {"s7c33": (1, 7, 33), "b2s5c96": (2, 5, 96)}


def fp8_out(shape):
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return torch.zeros(shape, dtype=FP8), torch.full((rows, 1), float("nan"))


def assert_quantized_like(q, scale, ref: torch.Tensor) -> None:
    """``q * scale`` is ``ref`` quantized rowwise: scales within a bf16 ulp, values within one fp8 ulp."""
    ref_q, ref_scale = quantize_rows_ref(ref)
    assert q.dtype == FP8 and q.shape == ref.shape and scale.shape == ref_scale.shape
    assert not scale.isnan().any()
    torch.testing.assert_close(scale, ref_scale, rtol=1e-2, atol=0)
    got, want = dequantize_rows(q, scale), dequantize_rows(ref_q, ref_scale)
    ulp = 0.13 * want.abs() + 2.0 ** -9 * ref_scale.reshape(*ref.shape[:-1], 1) * 1.02
    assert bool(((got - want).abs() <= ulp).all()), float((got - want).abs().max())
    assert float((q.float() != ref_q.float()).float().mean()) <= 0.05
    assert float(q.float().abs().max()) <= FP8_MAX


@pytest.mark.parametrize("kind", MODULATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_adaln_modulate_fp8_matches_reference(counters, shape, dtype, kind):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, offset=0.5)
    scale, shift = modulation(kind, *shape, dtype)
    out, out_scale = fp8_out(shape)
    torch.ops.diffc.adaln_modulate_fp8(x, scale, shift, EPS, out, out_scale)
    assert_kernel_ran()
    assert_quantized_like(out, out_scale, adaln_modulate_ref(x, scale, shift, EPS))


@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_adaln_fp8_matches_reference(counters, dtype, gated):
    shape = SHAPES["b2s5c96"]
    x, y = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    gate = randn(2, 1, 96, dtype=dtype, seed=3) if gated else None
    scale, shift = modulation("flux", *shape, dtype)
    residual = torch.full(shape, float("nan"), dtype=dtype)
    out, out_scale = fp8_out(shape)
    torch.ops.diffc.gated_residual_adaln_fp8(x, y, gate, scale, shift, EPS, residual, out, out_scale)
    assert_kernel_ran()
    ref_residual, ref_modulated = gated_residual_adaln_ref(x, y, gate, scale, shift, EPS)
    assert_matches(residual, ref_residual)
    assert_quantized_like(out, out_scale, ref_modulated)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 80), (5, 33), (3, 4100), (2, 64)], ids=["b2s3n80", "r5n33", "r3n4100", "r2n64"])
def test_gelu_tanh_fp8_matches_reference(counters, shape, dtype, bias):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0)
    b = randn(shape[-1], dtype=dtype, seed=2) if bias else None
    out, out_scale = fp8_out(shape)
    torch.ops.diffc.gelu_tanh_fp8(x, b, out, out_scale)
    assert_kernel_ran()
    assert_quantized_like(out, out_scale, gelu_tanh_ref(x, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 80), (5, 33), (7,)], ids=["b2s3n80", "r5n33", "one_row"])
def test_quantize_rows_matches_reference(counters, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=5, scale=3.0) * torch.logspace(-3, 2, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    x = x.to(dtype)
    out, out_scale = fp8_out(shape)
    torch.ops.diffc.quantize_rows(x, out, out_scale)
    assert_kernel_ran()
    assert_quantized_like(out, out_scale, x)


def test_quantize_rows_reads_strided_rows(counters):
    """A row-strided view (a slice of a wider activation, as of a concatenation) and a permuted view."""
    wide = randn(4, 6, 96, dtype=torch.bfloat16, seed=6)
    for view in (wide[..., 16:80], wide.transpose(0, 1)):
        out, out_scale = fp8_out(tuple(view.shape))
        torch.ops.diffc.quantize_rows(view, out, out_scale)
        assert_quantized_like(out, out_scale, view.contiguous())


def test_quantize_rows_refuses_bad_input():
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows(torch.zeros(3, 4, dtype=FP8), *fp8_out((3, 4)))
    assert exc.value.field == "x" and "already float8" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows(randn(3, 8, dtype=torch.bfloat16)[:, ::2], *fp8_out((3, 4)))
    assert exc.value.field == "x" and "stride 1" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows(randn(3, 8, dtype=torch.bfloat16), *fp8_out((3, 4)))
    assert exc.value.field == "out"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("widths", [(24, 80), (3, 5), (64, 1)], ids=["24+80", "3+5", "64+1"])
def test_quantize_rows_cat_quantizes_the_concatenation(counters, widths, dtype):
    """Rows of ``cat([a, b], -1)`` with one scale over both parts; a as a row-strided view (an attention output
    slice), b contiguous (production: FLUX.1's single block, 3072 + 12,288 over 4608 tokens)."""
    rows = torch.logspace(-2, 2, 6).reshape(2, 3, 1)
    a = (randn(2, 3, widths[0] + 8, dtype=torch.float32, seed=7) * rows).to(dtype)[..., 4 : 4 + widths[0]]
    b = (randn(2, 3, widths[1], dtype=torch.float32, seed=8) * 3 * rows).to(dtype)
    out, out_scale = fp8_out((2, 3, sum(widths)))
    torch.ops.diffc.quantize_rows_cat(a, b, out, out_scale)
    assert_kernel_ran()
    assert_quantized_like(out, out_scale, torch.cat([a, b], -1))
    single, single_scale = fp8_out((2, 3, sum(widths)))
    torch.ops.diffc.quantize_rows(torch.cat([a, b], -1), single, single_scale)
    assert torch.equal(out_scale, single_scale) and torch.equal(out.view(torch.uint8), single.view(torch.uint8))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantize_rows_cat_gelu_computes_the_mlp_on_the_way(counters, dtype, bias):
    """``cat([a, gelu_tanh(h + bias)])`` quantized: what diffc::gelu_tanh then quantize_rows_cat give."""
    a = randn(2, 5, 24, dtype=dtype, seed=9, scale=2.0)
    h = randn(2, 5, 40, dtype=dtype, seed=10, scale=3.0)
    b = randn(40, dtype=dtype, seed=11) if bias else None
    out, out_scale = fp8_out((2, 5, 64))
    torch.ops.diffc.quantize_rows_cat_gelu(a, h, b, out, out_scale)
    assert_kernel_ran()
    g = torch.empty_like(h)
    torch.ops.diffc.gelu_tanh(h, b, g)
    two, two_scale = fp8_out((2, 5, 64))
    torch.ops.diffc.quantize_rows_cat(a, g, two, two_scale)
    assert torch.equal(out_scale, two_scale) and torch.equal(out.view(torch.uint8), two.view(torch.uint8))
    assert_quantized_like(out, out_scale, torch.cat([a, gelu_tanh_ref(h, b)], -1))


def test_quantize_rows_cat_refuses_bad_input():
    a, b = randn(3, 8, dtype=torch.bfloat16), randn(3, 4, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows_cat(a, randn(4, 4, dtype=torch.bfloat16), *fp8_out((3, 12)))
    assert exc.value.field == "b" and "leading dimensions" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows_cat(a, b.float(), *fp8_out((3, 12)))
    assert exc.value.field == "b" and "dtype" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows_cat(a, b, *fp8_out((3, 8)))
    assert exc.value.field == "out"
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows_cat_gelu(a, b, randn(5, dtype=torch.bfloat16), *fp8_out((3, 12)))
    assert exc.value.field == "bias" and "(4,)" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.quantize_rows_cat_gelu(a, b[:2], None, *fp8_out((3, 12)))
    assert exc.value.field == "h"


def test_zero_rows_get_a_finite_scale(counters):
    x = torch.zeros(1, 3, 32, dtype=torch.bfloat16)
    out, out_scale = fp8_out((1, 3, 32))
    torch.ops.diffc.gelu_tanh_fp8(x, None, out, out_scale)
    assert bool((out.float() == 0).all()) and bool((out_scale > 0).all()) and bool(out_scale.isfinite().all())


# torch's schema check multiplies the outputs, which float8 does not implement on CPU; the fake-tensor and
# autograd-registration checks run, and the mutation of out / out_scale is what every test above reads.
OPCHECKS = ("test_faketensor", "test_autograd_registration")


def test_opcheck(counters):
    x = randn(2, 5, 32, dtype=torch.bfloat16)
    scale, shift = modulation("wan", 2, 5, 32, torch.bfloat16)
    y, gate = randn(2, 5, 32, dtype=torch.bfloat16, seed=2), randn(2, 1, 32, dtype=torch.bfloat16, seed=3)
    out, out_scale = fp8_out((2, 5, 32))
    torch.library.opcheck(torch.ops.diffc.adaln_modulate_fp8.default, (x, scale, shift, EPS, out, out_scale),
                          test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.diffc.gated_residual_adaln_fp8.default,
                          (x, y, gate, scale, shift, EPS, torch.empty_like(x), out, out_scale),
                          test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.diffc.gelu_tanh_fp8.default, (x, None, out, out_scale), test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.diffc.quantize_rows.default, (x, out, out_scale), test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.diffc.quantize_rows_cat.default, (x[..., :8], x[..., 8:], out, out_scale),
                          test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.diffc.quantize_rows_cat_gelu.default,
                          (x[..., :8], x[..., 8:], randn(24, dtype=torch.bfloat16), out, out_scale), test_utils=OPCHECKS)


@pytest.mark.parametrize("field,out,out_scale,fragment", [
    ("out", torch.zeros(2, 5, 32, dtype=torch.bfloat16), torch.zeros(10, 1), "expected dtype torch.float8_e4m3fn"),
    ("out_scale", torch.zeros(2, 5, 32, dtype=FP8), torch.zeros(10), "(10, 1): one scale per row of out"),
    ("out_scale", torch.zeros(2, 5, 32, dtype=FP8), torch.zeros(10, 1, dtype=torch.bfloat16), "expected dtype torch.float32"),
    ("out", torch.zeros(2, 5, 16, dtype=FP8), torch.zeros(10, 1), "expected shape (2, 5, 32)"),
])
def test_bad_destinations_are_refused(field, out, out_scale, fragment):
    x = randn(2, 5, 32, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.gelu_tanh_fp8(x, None, out, out_scale)
    assert exc.value.field == field and fragment in str(exc.value)


def test_weight_quantization_is_per_output_channel():
    w = randn(48, 32, seed=4) * torch.linspace(0.01, 10, 48)[:, None]  # rows of very different ranges
    w8, scale = quantize_weight(w.bfloat16())
    assert w8.dtype == FP8 and w8.shape == (48, 32) and scale.shape == (1, 48) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[0], w.bfloat16().float().abs().amax(1) / FP8_MAX)
    back = w8.float() * scale.reshape(-1, 1)
    rel = (back - w.bfloat16().float()).norm(dim=1) / w.bfloat16().float().norm(dim=1)
    assert float(rel.max()) < 0.04  # every row keeps its own precision


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_scaled_mm_rowwise_matches_the_dequantized_linear(bias):
    """What the lowered graph runs (``aten._scaled_mm`` with (M, 1) and (1, N) scales) against dequantized math,
    and the fp8 error against the bf16 linear it replaces."""
    x = randn(2, 6, 64, dtype=torch.bfloat16, seed=1)
    w = randn(48, 64, dtype=torch.bfloat16, seed=2, scale=0.1)
    b = randn(48, dtype=torch.bfloat16, seed=3) if bias else None
    q, qs = quantize_rows_ref(x)
    w8, ws = quantize_weight(w)
    # on the GPU where there is one: torch's CPU _scaled_mm takes rowwise scales only from 2.12 on
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch._scaled_mm(q.reshape(12, 64).to(dev), w8.t().to(dev), qs.to(dev), ws.to(dev),
                         None if b is None else b.to(dev), None, torch.bfloat16, False).reshape(2, 6, 48).cpu()
    ref = fp8_linear_ref(q, qs, w8, ws, b, torch.float32)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert float((y.float() - exact).norm() / exact.norm()) < 0.06
