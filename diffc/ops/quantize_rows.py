"""Rowwise float8_e4m3 quantization of an activation no fused kernel produces, in one pass.

The fp8 tier quantizes most GEMM inputs inside the kernel that computes them (:mod:`.fp8`). A linear
whose input comes from elsewhere (the attention output, a concatenation) gets this op instead: one
program per row loads the whole row once, takes its amax, and writes the fp8 row and its scale. That
costs one read of the activation and a write of half its size (GPU-NOTES.md: the same work as separate
torch ops, ``abs``/``amax``/``div``/``clamp``/``to``, costs as much as the fp8 GEMM saves); the fp8
lowering weighs it against the GEMM's saving per site (``diffc/compile/fp8.py``).

The result equals :func:`diffc.ops.fp8.quantize_rows_ref` of ``x``: scale = amax / 448 (floor 1e-12),
``q = clamp(x / scale)`` cast to float8_e4m3fn.

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
from .fp8 import FP8, check_fp8_out, store_rows_ref
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
def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_row, BLOCK: tl.constexpr):
    # one program per row; x: (rows, K) at stride (stride_row, 1); out: float8_e4m3 (rows, K) contiguous;
    # scale: (rows, 1) float32
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    y = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    qscale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / qscale, -448.0), 448.0)
    tl.store(out_ptr + row * K + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
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


def _check(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    expect_float("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise InvalidArgumentError("x", f"expected a tensor of rank >= 1 with rows of at least one element, "
                                        f"got shape {tuple(x.shape)}")
    if x.dtype == FP8:
        raise InvalidArgumentError("x", "is already float8_e4m3fn")
    expect_unit_last_stride("x", x)
    check_fp8_out(out, out_scale, tuple(x.shape))
    expect_same_device({"x": x, "out": out, "out_scale": out_scale})


def _quantize_rows_into_ref(x, out, out_scale) -> None:
    store_rows_ref(x, out, out_scale)


@register_op("quantize_rows", mutates_args=("out", "out_scale"), fake=_check, fallback=_quantize_rows_into_ref)
def _quantize_rows_launch(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check(x, out, out_scale)
    if x.numel() == 0:
        return
    k = x.shape[-1]
    stride = _rows_stride(x)
    if stride is None:  # leading dimensions that do not flatten to one strided axis (a permuted view)
        x, stride = x.contiguous(), k
    if _cuda_launch(x, out, out_scale, k, stride):
        return
    block = next_pow2(k)
    quantize_rows_kernel[(x.numel() // k,)](
        x, out, out_scale, k, stride, BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )


def _cuda_launch(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor, k: int, stride: int) -> bool:
    """Run csrc/quantize_rows.cu when it applies (see :mod:`.csrc`); False leaves the row to Triton."""
    shape = csrc.row_launch(k, x.dtype)
    if shape is None or stride % (16 // x.element_size()) or not csrc.aligned(x, out):
        return False
    nv, threads = shape
    kern = csrc.kernel("quantize_rows", f"quantize_rows_{csrc.DTYPE_NAMES[x.dtype]}_{nv}", x.device)
    if kern is None:
        return False
    csrc.launch(kern, x.device, x.numel() // k, threads, x, out, out_scale, np.int32(k), np.int64(stride))
    return True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.quantize_rows``: x (..., K) -> (fp8 (..., K), float32 (rows, 1) scales)."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    out_scale = torch.empty(x.numel() // max(1, x.shape[-1]), 1, dtype=torch.float32, device=x.device)
    torch.ops.diffc.quantize_rows(x, out, out_scale)
    return out, out_scale


__all__ = ["quantize_rows", "quantize_rows_kernel"]
