"""RMSNorm over the last dimension of a strided activation, written contiguous: ``diffc::rms_norm``.

DiTs normalise queries and keys per head (``head_dim`` 64 or 128) right after splitting heads, on a
transposed view: diffusers' SD3 and HunyuanVideo blocks call ``RMSNorm`` on ``q.view(B, S, H, D)
.transpose(1, 2)``. ``aten.rms_norm`` first copies such a view to contiguous memory, then runs a row
kernel that gives each 64- or 128-element row to one block; this op reads the view in place and
normalises ``BLOCK_R`` rows per program, so one pass over memory does both.

Semantics of ``aten.rms_norm``: ``y = x * rsqrt(mean(x^2) + eps) * weight`` in float32 with one rounding
to ``x``'s dtype (weight optional, in ``x``'s dtype). The output is contiguous in ``x``'s shape.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .registry import cdiv, expect_dtype, expect_float, expect_same_device, next_pow2, register_op, tl, triton_kernel

MAX_DIMS = 4  # x is viewed as (A, B, C, D); fewer dimensions are padded in front
MAX_WIDTH = 8192  # the row is one register tile
TILE = 4096  # elements per program: BLOCK_R rows of BLOCK_D


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``aten.rms_norm``'s math: float32 statistics and product, one rounding."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


@triton_kernel
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, n1, n2, s0, s1, s2, D, eps,
                    HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # x: (n0, n1, n2, D) with strides (s0, s1, s2, 1); out: contiguous, row r = ((i0 * n1) + i1) * n2 + i2
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    i2 = r % n2
    i1 = (r // n2) % n1
    i0 = r // (n1 * n2)
    src = i0 * s0 + i1 * s1 + i2 * s2
    mask = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(out_ptr + r[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor) -> None:
    expect_float("x", x)
    if not 1 <= x.ndim <= MAX_DIMS or x.shape[-1] < 1 or x.shape[-1] > MAX_WIDTH:
        raise InvalidArgumentError("x", f"expected 1 to {MAX_DIMS} dimensions with a last one of 1 to {MAX_WIDTH}, "
                                        f"got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise InvalidArgumentError("x", f"the last dimension must be contiguous (stride 1), got strides {x.stride()}")
    if weight is not None:
        if tuple(weight.shape) != (x.shape[-1],):
            raise InvalidArgumentError("weight", f"expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")
        expect_dtype("weight", weight, x.dtype)
        if weight.stride(0) != 1 and x.shape[-1] > 1:
            raise InvalidArgumentError("weight", "must be contiguous")
    if not isinstance(eps, float) or not eps >= 0:
        raise InvalidArgumentError("eps", f"expected a float >= 0, got {eps!r}")
    if tuple(out.shape) != tuple(x.shape):
        raise InvalidArgumentError("out", f"expected shape {tuple(x.shape)}, got {tuple(out.shape)}")
    expect_dtype("out", out, x.dtype)
    if not out.is_contiguous():
        raise InvalidArgumentError("out", "must be contiguous")
    expect_same_device({"x": x, "out": out, **({"weight": weight} if weight is not None else {})})


def _rms_norm_into_ref(x, weight, eps, out) -> None:
    out.copy_(rms_norm_ref(x, weight, eps))


@register_op("rms_norm", mutates_args=("out",), fake=_check, fallback=_rms_norm_into_ref)
def _rms_norm_launch(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor) -> None:
    _check(x, weight, eps, out)
    if out.numel() == 0:
        return
    shape = (1,) * (MAX_DIMS - x.ndim) + tuple(x.shape)
    strides = (0,) * (MAX_DIMS - x.ndim) + tuple(x.stride())
    width = shape[-1]
    rows = out.numel() // width
    block_d = next_pow2(width)
    block_r = max(1, min(TILE // block_d, next_pow2(rows)))
    rms_norm_kernel[(cdiv(rows, block_r),)](
        x, weight if weight is not None else x, out, rows, shape[1], shape[2], strides[0], strides[1], strides[2],
        width, eps, HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if block_d * block_r <= 2048 else 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.diffc.rms_norm``: RMSNorm of ``x`` (any strides, last one 1) over its last dimension, into a
    contiguous tensor of ``x``'s shape."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    torch.ops.diffc.rms_norm(x, weight, eps, out)
    return out
