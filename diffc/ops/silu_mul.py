"""SwiGLU gate ``silu(a) * b`` over a last dimension that concatenates ``[a | b]``.

The gated feed-forward of newer DiTs (Qwen-Image, Z-Image, HunyuanVideo's text path) projects to
``2 * N`` channels in one GEMM and gates one half with the other. Neither FLUX.1 nor Wan2.1 uses it
(their MLPs are GELU-tanh, see ``gelu_tanh``); the reference is the standard definition. Computed in
float32 with one rounding (eager rounds ``silu(a)`` first; within the bf16 tolerance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import cdiv, expect_dtype, expect_float, expect_same_device, register_op, tl, triton_kernel

BLOCK = 1024


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2N) holding ``[a | b]`` -> ``silu(a) * b``: (..., N) in x's dtype."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@triton_kernel
def silu_mul_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # grid (rows, cdiv(N, BLOCK)); x: contiguous (rows, 2N) = [a | b]; out: contiguous (rows, N)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    src = x_ptr + row * (2 * N) + cols
    a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(src + N, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, out: torch.Tensor) -> None:
    expect_float("x", x)
    if x.ndim < 1 or x.shape[-1] % 2 or not x.is_contiguous():
        raise InvalidArgumentError("x", f"expected a contiguous (..., 2N) tensor, got shape {tuple(x.shape)}")
    want = (*x.shape[:-1], x.shape[-1] // 2)
    if tuple(out.shape) != want:
        raise InvalidArgumentError("out", f"expected shape {want}, got {tuple(out.shape)}")
    expect_dtype("out", out, x.dtype)
    if not out.is_contiguous():
        raise InvalidArgumentError("out", "must be contiguous")
    expect_same_device({"x": x, "out": out})


def _silu_mul_into_ref(x, out) -> None:
    out.copy_(silu_mul_ref(x))


@register_op("silu_mul", mutates_args=("out",), fake=_check, fallback=_silu_mul_into_ref)
def _silu_mul_launch(x: torch.Tensor, out: torch.Tensor) -> None:
    _check(x, out)
    if out.numel() == 0:
        return
    n = out.shape[-1]
    silu_mul_kernel[(out.numel() // n, cdiv(n, BLOCK))](x, out, n, BLOCK=BLOCK, num_warps=4)


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.diffc.silu_mul``: x (..., 2N) -> ``silu(a) * b`` (..., N) in x's dtype."""
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2) if out is None else out
    torch.ops.diffc.silu_mul(x, out)
    return out
