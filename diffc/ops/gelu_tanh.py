"""Bias add + tanh-approximated GELU, the epilogue of the feed-forward's first linear layer.

FLUX (``ff.net.0``, ``ff_context.net.0``, the single-stream ``proj_mlp``), Wan (``ffn.net.0``) and
Wan's text projection apply ``F.gelu(linear(x), approximate="tanh")``. Splitting the bias out of the
GEMM, the op computes ``gelu_tanh(x + bias)`` in float32 with one rounding, where eager rounds the
sum to the activations' dtype first (within the bf16 tolerance; bit-identical in float32 up to the
``tanh``). ``tanh`` is written as ``2 * sigmoid(2u) - 1``: ``0.5 * v * (1 + tanh(u)) == v * sigmoid(2u)``.

The fp8 variant (``gelu_tanh_fp8``, the fp8 tier's feed-forward) runs the CUDA C++ kernel of
``csrc/gelu_tanh_fp8.cu`` on a GPU where it can (:mod:`.csrc`), else its Triton kernel; the same math,
within float rounding of the fast ``exp2`` and division both use. Both write ``-2u log2(e)`` as
``v * (K0 + K1 v^2)`` with the constants folded, so the exponential is one ``exp2`` of three operations:
the kernel is bound by the GPU's special-function unit (its ``exp2`` and reciprocal) and float32 issue, not
by memory (8-13% faster than the earlier form on an H100: ``bench/results/ops/h100-2026-12-05-gelu-fp8-old-new.txt``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from . import csrc
from .fp8 import FP8, check_fp8_out, store_rows_ref
from .registry import (cdiv, expect_dtype, expect_float, expect_same_device, expect_shape, next_pow2, register_op, tl,
                       triton_kernel)

BLOCK = 1024
SQRT_2_OVER_PI = 0.7978845608028654
GELU_CUBIC = 0.044715


def gelu_tanh_ref(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The models' math with the linear's bias split out. x: (..., N); bias: (N,) or None -> x's shape/dtype."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@triton_kernel
def gelu_tanh_kernel(
    x_ptr, bias_ptr, out_ptr, N,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (rows, cdiv(N, BLOCK)); x, out: contiguous (rows, N); bias: (N,)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = tl.program_id(0).to(tl.int64) * N + cols
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    y = v / (1.0 + tl.exp(-2.0 * u))  # v * sigmoid(2u)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton_kernel
def gelu_tanh_fp8_kernel(
    x_ptr, bias_ptr, out_ptr, scale_ptr, N,
    HAS_BIAS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # one program per row, the row in registers as two power-of-two parts: columns [0, BLOCK_A) with
    # BLOCK_A <= N, then [BLOCK_A, BLOCK_A + BLOCK_B) masked to N (BLOCK_B = 0: none). One block padded to
    # next_pow2(N) computes on every padding lane: 16,384 lanes for Wan's 8,960 columns, 9,216 here.
    # x: contiguous (rows, N); out: float8_e4m3 (rows, N); scale: (rows, 1) float32
    row = tl.program_id(0).to(tl.int64)
    cols_a = tl.arange(0, BLOCK_A)
    v = tl.load(x_ptr + row * N + cols_a).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols_a).to(tl.float32)
    # v * sigmoid(2u) = v / (1 + 2^t), t = -2u log2(e) with the constants folded: csrc/common.cuh's gelu_tanh
    y_a = tl.fdiv(v, 1.0 + tl.exp2(v * (-0.1029432395800235 * v * v - 2.302208198144325)), ieee_rounding=False)
    y_a = y_a.to(x_ptr.dtype.element_ty).to(tl.float32)  # what the bf16 op would store
    amax = tl.max(tl.abs(y_a), axis=0)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < N
        v = tl.load(x_ptr + row * N + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        y_b = tl.fdiv(v, 1.0 + tl.exp2(v * (-0.1029432395800235 * v * v - 2.302208198144325)), ieee_rounding=False)
        y_b = tl.where(mask_b, y_b.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(y_b), axis=0))
    qscale = tl.maximum(amax, 1e-12) / 448.0
    inv = 1.0 / qscale
    q = tl.minimum(tl.maximum(y_a * inv, -448.0), 448.0)
    tl.store(out_ptr + row * N + cols_a, q.to(out_ptr.dtype.element_ty))
    if BLOCK_B > 0:
        q = tl.minimum(tl.maximum(y_b * inv, -448.0), 448.0)
        tl.store(out_ptr + row * N + cols_b, q.to(out_ptr.dtype.element_ty), mask=mask_b)
    tl.store(scale_ptr + row, qscale)


def _check_input(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    expect_float("x", x)
    if x.ndim < 1 or not x.is_contiguous():
        raise InvalidArgumentError("x", f"expected a contiguous tensor of rank >= 1, got shape {tuple(x.shape)}")
    if bias is not None:
        expect_shape("bias", bias, (x.shape[-1],), f"({x.shape[-1]},) (x's last dimension)")
        expect_float("bias", bias)
        if not bias.is_contiguous():
            raise InvalidArgumentError("bias", "must be contiguous")


def _check(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    _check_input(x, bias)
    expect_shape("out", out, tuple(x.shape))
    expect_dtype("out", out, x.dtype)
    if not out.is_contiguous():
        raise InvalidArgumentError("out", "must be contiguous")
    expect_same_device({"x": x, "bias": bias, "out": out})


def _gelu_tanh_into_ref(x, bias, out) -> None:
    out.copy_(gelu_tanh_ref(x, bias))


@register_op("gelu_tanh", mutates_args=("out",), fake=_check, fallback=_gelu_tanh_into_ref)
def _gelu_tanh_launch(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    _check(x, bias, out)
    if x.numel() == 0:
        return
    n = x.shape[-1]
    gelu_tanh_kernel[(x.numel() // n, cdiv(n, BLOCK))](
        x, bias if bias is not None else x, out, n,
        HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4,
    )


def _check_fp8(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_input(x, bias)
    check_fp8_out(out, out_scale, tuple(x.shape))
    expect_same_device({"x": x, "bias": bias, "out": out, "out_scale": out_scale})


def _gelu_tanh_fp8_into_ref(x, bias, out, out_scale) -> None:
    store_rows_ref(gelu_tanh_ref(x, bias), out, out_scale)


@register_op("gelu_tanh_fp8", mutates_args=("out", "out_scale"), fake=_check_fp8, fallback=_gelu_tanh_fp8_into_ref)
def _gelu_tanh_fp8_launch(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """``gelu_tanh(x + bias)`` quantized rowwise to float8_e4m3: the whole row in one program (its amax)."""
    _check_fp8(x, bias, out, out_scale)
    if x.numel() == 0:
        return
    n = x.shape[-1]
    if _cuda_fp8_launch(x, bias, out, out_scale):
        return
    block_a = next_pow2(n + 1) // 2  # the largest power of two <= n
    block_b = next_pow2(n - block_a) if n > block_a else 0
    gelu_tanh_fp8_kernel[(x.numel() // n,)](
        x, bias if bias is not None else x, out, out_scale, n,
        HAS_BIAS=bias is not None, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=max(1, min(16, block_a // 512)),
    )


def _cuda_fp8_launch(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor) -> bool:
    """Run csrc/gelu_tanh_fp8.cu when it applies (see :mod:`.csrc`); False leaves the rows to Triton."""
    n = x.shape[-1]
    shape = csrc.row_launch(n, x.dtype)
    if shape is None or (bias is not None and bias.dtype != x.dtype) or not csrc.aligned(x, bias, out):
        return False
    nv, threads = shape
    kern = csrc.kernel("gelu_tanh_fp8", f"gelu_tanh_fp8_{csrc.DTYPE_NAMES[x.dtype]}_{nv}", x.device)
    if kern is None:
        return False
    csrc.launch(kern, x.device, x.numel() // n, threads, x, bias, out, out_scale, np.int32(n))
    return True


def gelu_tanh_fp8(x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.gelu_tanh_fp8`` -> (fp8 of x's shape, float32 (rows, 1) scales)."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    out_scale = torch.empty(x.numel() // max(1, x.shape[-1]), 1, dtype=torch.float32, device=x.device)
    torch.ops.diffc.gelu_tanh_fp8(x, bias, out, out_scale)
    return out, out_scale


def gelu_tanh(x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.diffc.gelu_tanh``: ``gelu_tanh(x + bias)``, x (..., N), bias (N,) -> x's shape and dtype."""
    out = torch.empty_like(x) if out is None else out
    torch.ops.diffc.gelu_tanh(x, bias, out)
    return out
