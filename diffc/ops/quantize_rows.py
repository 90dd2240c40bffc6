"""Rowwise float8_e4m3 quantization of an activation no fused kernel produces, in one pass.

The fp8 tier quantizes most GEMM inputs inside the kernel that computes them (:mod:`.fp8`). A linear
whose input comes from elsewhere (the attention output, a concatenation) gets this op instead: one
program per row loads the whole row once, takes its amax, and writes the fp8 row and its scale. That
costs one read of the activation and a write of half its size (GPU-NOTES.md: the same work as separate
torch ops, ``abs``/``amax``/``div``/``clamp``/``to``, costs as much as the fp8 GEMM saves); the fp8
lowering weighs it against the GEMM's saving per site (``diffc/compile/fp8.py``).

The result equals :func:`diffc.ops.fp8.quantize_rows_ref` of ``x``: scale = amax / 448 (floor 1e-12),
``q = clamp(x / scale)`` cast to float8_e4m3fn.

``quantize_rows_cat(a, b)`` quantizes ``cat([a, b], -1)`` without writing the concatenation: FLUX.1's
single-stream block concatenates its attention output (3072 wide) and MLP activation (12,288) before
``proj_out``, a copy of 141 MB per block that the fp8 lowering drops (``diffc/compile/fp8.py``).
``quantize_rows_cat_gelu(a, h, bias)`` also computes that MLP activation, ``gelu_tanh(h + bias)`` rounded
to the activations' dtype as ``diffc::gelu_tanh`` stores it, in the same pass (:mod:`.gelu_tanh`'s math).

On a GPU the CUDA C++ kernel of ``csrc/quantize_rows.cu`` runs where it can (:mod:`.csrc`: cuda-python
installed, sm_89 or newer, rows of whole 16-byte vectors): it keeps the row packed in registers from
the 128-bit loads to the fp8 stores (bench/ops/bench_fp8_quant.py times both). Elsewhere the Triton
kernel runs; both compute the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgumentError
from . import csrc
from .fp8 import FP8, check_fp8_out, quantize_rows_ref, store_rows_ref
from .gelu_tanh import gelu_tanh_ref
from .registry import (
    expect_float,
    expect_same_device,
    expect_unit_last_stride,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)


@triton_kernel
def quantize_rows_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, scale_ptr, KA, KB, stride_a, stride_b,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GELU_B: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one program per row of cat([a, b], -1) (BLOCK_B = 0: no b; GELU_B: b is gelu_tanh(h + bias) of the h given
    # as b, rounded to its dtype); a: (rows, KA) at stride (stride_a, 1); b: (rows, KB) at stride (stride_b, 1);
    # bias: (KB,); out: float8_e4m3 (rows, KA + KB) contiguous; scale: (rows, 1) float32
    row = tl.program_id(0).to(tl.int64)
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = cols_a < KA
    ya = tl.load(a_ptr + row * stride_a + cols_a, mask=mask_a, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(ya), axis=0)
    if BLOCK_B > 0:
        cols_b = tl.arange(0, BLOCK_B)
        mask_b = cols_b < KB
        yb = tl.load(b_ptr + row * stride_b + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        if GELU_B:  # gelu_tanh_fp8's math (gelu_tanh.py), the sum in float32, the result in b's dtype
            if HAS_BIAS:
                yb += tl.load(bias_ptr + cols_b, mask=mask_b, other=0.0).to(tl.float32)
            yb = tl.fdiv(yb, 1.0 + tl.exp2(yb * (-0.1029432395800235 * yb * yb - 2.302208198144325)),
                         ieee_rounding=False)
            yb = tl.where(mask_b, yb.to(b_ptr.dtype.element_ty).to(tl.float32), 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(yb), axis=0))
    qscale = tl.maximum(amax, 1e-12) / 448.0
    out_row = out_ptr + row * (KA + KB)
    q = tl.minimum(tl.maximum(ya / qscale, -448.0), 448.0)
    tl.store(out_row + cols_a, q.to(out_ptr.dtype.element_ty), mask=mask_a)
    if BLOCK_B > 0:
        q = tl.minimum(tl.maximum(yb / qscale, -448.0), 448.0)
        tl.store(out_row + KA + cols_b, q.to(out_ptr.dtype.element_ty), mask=mask_b)
    tl.store(scale_ptr + row, qscale)


def _rows_stride(x: torch.Tensor) -> int | None:
    """The stride between x's rows when its leading dimensions flatten to one evenly strided axis, else None."""
    if x.ndim == 1:
        return x.shape[0]
    stride = x.stride(-2)
    expected = stride
    for size, s in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size != 1 and s != expected:
            return None
        expected *= size
    return stride


def _check_part(field: str, x: torch.Tensor) -> None:
    expect_float(field, x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise InvalidArgumentError(field, f"expected a tensor of rank >= 1 with rows of at least one element, "
                                          f"got shape {tuple(x.shape)}")
    if x.dtype == FP8:
        raise InvalidArgumentError(field, "is already float8_e4m3fn")
    expect_unit_last_stride(field, x)


def _check(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_part("x", x)
    check_fp8_out(out, out_scale, tuple(x.shape))
    expect_same_device({"x": x, "out": out, "out_scale": out_scale})


def _check_cat(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor,
               b_field: str = "b") -> None:
    _check_part("a", a)
    _check_part(b_field, b)
    if b.dtype != a.dtype:
        raise InvalidArgumentError(b_field, f"expected a's dtype {a.dtype}, got {b.dtype}")
    if tuple(b.shape[:-1]) != tuple(a.shape[:-1]):
        raise InvalidArgumentError(b_field, f"expected the leading dimensions of a {tuple(a.shape[:-1])}, got shape "
                                            f"{tuple(b.shape)}")
    check_fp8_out(out, out_scale, (*a.shape[:-1], a.shape[-1] + b.shape[-1]))
    expect_same_device({"a": a, "b": b, "out": out, "out_scale": out_scale})


def _quantize_rows_into_ref(x, out, out_scale) -> None:
    store_rows_ref(x, out, out_scale)


def _quantize_rows_cat_into_ref(a, b, out, out_scale) -> None:
    store_rows_ref(torch.cat([a, b], -1), out, out_scale)


def quantize_rows_cat_gelu_ref(a: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What the op computes: ``cat([a, gelu_tanh(h + bias)])`` quantized rowwise, the sum in float32 and the GELU
    rounded to h's dtype as ``diffc::gelu_tanh`` stores it."""
    g = gelu_tanh_ref(h.float(), None if bias is None else bias.float()).to(h.dtype)
    return quantize_rows_ref(torch.cat([a, g], -1))


def _quantize_rows_cat_gelu_into_ref(a, h, bias, out, out_scale) -> None:
    q, scale = quantize_rows_cat_gelu_ref(a, h, bias)
    out.copy_(q)
    out_scale.copy_(scale)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x and the stride between its rows (a contiguous copy where its leading dimensions do not flatten)."""
    stride = _rows_stride(x)
    return (x, stride) if stride is not None else (x.contiguous(), x.shape[-1])


def _quantize(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor,
              gelu: bool = False, bias: torch.Tensor | None = None) -> None:
    """Quantize the rows of ``a`` (``b`` None) or of ``cat([a, b], -1)`` into ``out`` / ``out_scale``; ``gelu``:
    of ``cat([a, gelu_tanh(b + bias)], -1)``."""
    if out.numel() == 0:
        return
    ka, kb = a.shape[-1], 0 if b is None else b.shape[-1]
    a, stride_a = _rows(a)
    b, stride_b = (a, 0) if b is None else _rows(b)  # no b: a stands in for the pointer, never read
    if _cuda_launch(a, stride_a, ka, b, stride_b, kb, out, out_scale, gelu, bias):
        return
    block_a = next_pow2(ka)
    block_b = next_pow2(kb) if kb else 0
    quantize_rows_kernel[(out.numel() // (ka + kb),)](
        a, b, bias if bias is not None else a, out, out_scale, ka, kb, stride_a, stride_b, BLOCK_A=block_a,
        BLOCK_B=block_b, GELU_B=gelu, HAS_BIAS=bias is not None, num_warps=max(1, min(16, (block_a + block_b) // 512)),
    )


@register_op("quantize_rows", mutates_args=("out", "out_scale"), fake=_check, fallback=_quantize_rows_into_ref)
def _quantize_rows_launch(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check(x, out, out_scale)
    _quantize(x, None, out, out_scale)


@register_op("quantize_rows_cat", mutates_args=("out", "out_scale"), fake=_check_cat,
             fallback=_quantize_rows_cat_into_ref)
def _quantize_rows_cat_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """The rows of ``cat([a, b], -1)`` quantized without writing the concatenation."""
    _check_cat(a, b, out, out_scale)
    _quantize(a, b, out, out_scale)


def _check_cat_gelu(a: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                    out_scale: torch.Tensor) -> None:
    _check_cat(a, h, out, out_scale, b_field="h")
    if bias is not None:
        expect_float("bias", bias)
        if tuple(bias.shape) != (h.shape[-1],) or not bias.is_contiguous():
            raise InvalidArgumentError("bias", f"expected a contiguous ({h.shape[-1]},) tensor (h's last dimension), "
                                               f"got shape {tuple(bias.shape)}")
        expect_same_device({"h": h, "bias": bias})


@register_op("quantize_rows_cat_gelu", mutates_args=("out", "out_scale"), fake=_check_cat_gelu,
             fallback=_quantize_rows_cat_gelu_into_ref)
def _quantize_rows_cat_gelu_launch(a: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                                   out_scale: torch.Tensor) -> None:
    """The rows of ``cat([a, gelu_tanh(h + bias)], -1)`` quantized, the GELU computed on the way."""
    _check_cat_gelu(a, h, bias, out, out_scale)
    _quantize(a, h, out, out_scale, gelu=True, bias=bias)


def _cuda_launch(a, stride_a: int, ka: int, b, stride_b: int, kb: int, out, out_scale, gelu: bool, bias) -> bool:
    """Run csrc/quantize_rows.cu when it applies (see :mod:`.csrc`); False leaves the rows to Triton."""
    per_vector = 16 // a.element_size()
    shape = csrc.row_launch(ka + kb, a.dtype)
    if (shape is None or ka % per_vector or kb % per_vector or stride_a % per_vector or stride_b % per_vector
            or (bias is not None and bias.dtype != a.dtype) or not csrc.aligned(a, b, bias, out)):
        return False
    nv, threads = shape
    name = f"quantize_rows_{'gelu_' if gelu else ''}{csrc.DTYPE_NAMES[a.dtype]}_{nv}"
    kern = csrc.kernel("quantize_rows", name, a.device)
    if kern is None:
        return False
    csrc.launch(kern, a.device, out.numel() // (ka + kb), threads, a, np.int64(stride_a), np.int32(ka), b,
                np.int64(stride_b), np.int32(kb), bias, out, out_scale)
    return True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.quantize_rows``: x (..., K) -> (fp8 (..., K), float32 (rows, 1) scales)."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    out_scale = torch.empty(x.numel() // max(1, x.shape[-1]), 1, dtype=torch.float32, device=x.device)
    torch.ops.diffc.quantize_rows(x, out, out_scale)
    return out, out_scale


def quantize_rows_cat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.quantize_rows_cat``: a (..., Ka), b (..., Kb) -> (fp8 (..., Ka + Kb), (rows, 1) scales)."""
    out = torch.empty(*a.shape[:-1], a.shape[-1] + b.shape[-1], dtype=FP8, device=a.device)
    out_scale = torch.empty(out.numel() // max(1, out.shape[-1]), 1, dtype=torch.float32, device=a.device)
    torch.ops.diffc.quantize_rows_cat(a, b, out, out_scale)
    return out, out_scale


__all__ = ["quantize_rows", "quantize_rows_cat", "quantize_rows_cat_gelu_ref", "quantize_rows_kernel"]
