"""Sinusoidal timestep projection in one kernel: frequencies, angles, cos/sin, order, padding and cast.

FLUX's ``timestep_sinusoid`` and Wan's ``timestep_sinusoids`` are both diffusers' ``Timesteps`` with
``flip_sin_to_cos=True`` (cosines first), ``downscale_freq_shift=0``, ``scale=1`` and max period
10000; Wan pads an odd width with one zero column. The op takes the general parameters (see
:data:`MODEL_SETTINGS`) and writes into ``out`` of any float dtype, so the model's following
``.to(dtype)`` is fused too. Angles reach 1000 rad, so compiled kernels use libdevice's accurate
``exp``/``cos``/``sin`` and a correctly rounded division rather than the fast approximations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import (
    cdiv,
    expect_float,
    expect_same_device,
    interpreting,
    libdevice,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)

# Keyword arguments reproducing each model's projection (its width is the model's config).
MODEL_SETTINGS: dict[str, dict] = {
    "flux": {"flip_sin_to_cos": True, "downscale_freq_shift": 0.0, "scale": 1.0, "max_period": 10000.0},  # dim 256
    "wan": {"flip_sin_to_cos": True, "downscale_freq_shift": 0.0, "scale": 1.0, "max_period": 10000.0},  # dim freq_dim
}


def timestep_embedding_ref(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """The models' math. t: (N,) timesteps of any dtype -> (N, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    args = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


@triton_kernel
def timestep_embedding_kernel(
    t_ptr, out_ptr,
    HALF, neg_log_period, denom, scale, so_n,
    FLIP: tl.constexpr, PAD: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (N, cdiv(HALF, BLOCK)); t: (N,); out: (N, 2 * HALF + PAD), row stride so_n
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < HALF
    t = tl.load(t_ptr + n).to(tl.float32)
    exponent = tl.math.div_rn(neg_log_period * i.to(tl.float32), denom)
    if LIBDEVICE:
        args = scale * (t * libdevice.exp(exponent))
        cos = libdevice.cos(args)
        sin = libdevice.sin(args)
    else:
        args = scale * (t * tl.exp(exponent))
        cos = tl.cos(args)
        sin = tl.sin(args)
    if FLIP:
        first, second = cos, sin
    else:
        first, second = sin, cos
    row = out_ptr + n * so_n
    tl.store(row + i, first.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(row + HALF + i, second.to(out_ptr.dtype.element_ty), mask=mask)
    if PAD:  # noqa: SIM102 (PAD is a compile-time constant; the pid test is not)
        if tl.program_id(1) == 0:
            tl.store(row + 2 * HALF, tl.zeros((), dtype=out_ptr.dtype.element_ty))


def _check(t, flip_sin_to_cos, downscale_freq_shift, scale, max_period, out) -> None:
    if t.ndim != 1:
        raise InvalidArgumentError("t", f"expected shape (N,), got {tuple(t.shape)}")
    if out.ndim != 2 or out.shape[0] != t.shape[0] or out.shape[1] < 2:
        raise InvalidArgumentError("out", f"expected shape ({t.shape[0]}, dim) with dim >= 2, got {tuple(out.shape)}")
    expect_float("out", out)
    if out.stride(1) != 1:
        raise InvalidArgumentError("out", f"last dimension must be contiguous, got strides {out.stride()}")
    if out.shape[1] // 2 == downscale_freq_shift:
        raise InvalidArgumentError("downscale_freq_shift", f"must differ from dim // 2 = {out.shape[1] // 2}")
    if max_period <= 0:
        raise InvalidArgumentError("max_period", f"must be positive, got {max_period}")
    expect_same_device({"t": t, "out": out})


def _timestep_embedding_into_ref(t, flip_sin_to_cos, downscale_freq_shift, scale, max_period, out) -> None:
    out.copy_(timestep_embedding_ref(t, out.shape[1], flip_sin_to_cos, downscale_freq_shift, scale, max_period))


@register_op("timestep_embedding", mutates_args=("out",), fake=_check, fallback=_timestep_embedding_into_ref)
def _timestep_embedding_launch(
    t: torch.Tensor,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float,
    max_period: float,
    out: torch.Tensor,
) -> None:
    _check(t, flip_sin_to_cos, downscale_freq_shift, scale, max_period, out)
    n, dim = out.shape
    half = dim // 2
    block = min(1024, next_pow2(half))
    timestep_embedding_kernel[(n, cdiv(half, block))](
        t, out,
        half, -math.log(max_period), half - downscale_freq_shift, scale, out.stride(0),
        FLIP=flip_sin_to_cos, PAD=dim % 2 == 1, LIBDEVICE=not interpreting() and libdevice is not None,
        BLOCK=block, num_warps=max(1, min(4, block // 128)),
    )


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch.ops.diffc.timestep_embedding``: t (N,) -> (N, dim) in ``dtype`` (computed in float32)."""
    out = torch.empty(t.shape[0], dim, dtype=dtype, device=t.device)
    torch.ops.diffc.timestep_embedding(t, flip_sin_to_cos, downscale_freq_shift, scale, max_period, out)
    return out
