"""Channel RMS norm + SiLU of a video VAE's feature map, written into a zero-bordered convolution input:
``diffc::channel_rms_norm_silu``.

The Wan VAEs run ``silu(RMSNorm(x))`` before most causal 3-D convolutions, normalising over the channel
dimension of an NCTHW map: ``F.normalize(x.float(), dim=1).to(dtype) * sqrt(C) * gamma``, then SiLU, then
the convolution pads the result (past frames in time, a zero border in space). Eager torch makes a float32
copy, reduces over a strided dimension, casts, multiplies twice, applies SiLU, concatenates the cached
frames and pads: about ten passes over the largest tensors of the decode. This op reads ``x`` once (twice
from L2), rounds where eager rounds, and writes each frame straight into its place in the padded
convolution input (``out``: ``x``'s frames with ``pad_h`` / ``pad_w`` zero rows / columns on each side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import (cdiv, expect_dtype, expect_float, expect_same_device, interpreting, libdevice, next_pow2,
                       register_op, tl, triton_kernel)

BLOCK_W = 64  # output columns per program
BLOCK_C = 32  # channels per step of the loop over channels


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def channel_rms_norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, scale: float, eps: float,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Wan VAE's eager math (``RMSNorm`` with ``F.normalize`` in float32, then SiLU), unpadded; ``bias`` is
    the producing convolution's, added first (as torch adds it after cuDNN's convolution)."""
    if bias is not None:
        x = x + _per_channel(bias, x.dim())
    x32 = x.float() if x.element_size() < 4 else x
    y = F.normalize(x32, dim=1, eps=eps).to(x.dtype) * scale * _per_channel(gamma, x.dim())
    return F.silu(y)


def channel_bias_residual_ref(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``(x + bias) + residual``: a convolution's output, its bias (per channel, dim 1) and a residual branch."""
    return (x + _per_channel(bias, x.dim())) + residual


@triton_kernel
def channel_rms_norm_silu_kernel(
    x_ptr, g_ptr, bias_ptr, out_ptr,
    C, T, H, W, HP, WP, PAD_H, PAD_W,
    sxb, sxc, sxt, sxh, sxw, sob, soc, sot, soh, sow,
    scale, eps,
    HAS_BIAS: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # grid (B * T * HP, cdiv(WP, BLOCK_W)); one program: BLOCK_W output columns of one padded row
    row = tl.program_id(0)
    hp = row % HP
    t = (row // HP) % T
    b = row // (HP * T)
    h = hp - PAD_H
    wp = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w = wp - PAD_W
    hw = h + tl.zeros_like(w)  # h as a vector: the interpreter cannot mix scalar and vector masks
    inside = (w >= 0) & (w < W) & (hw >= 0) & (hw < H)  # border positions read nothing and write zeros
    x_row = x_ptr + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    o_row = out_ptr + b.to(tl.int64) * sob + t.to(tl.int64) * sot + hp.to(tl.int64) * soh + wp.to(tl.int64) * sow
    cs = tl.arange(0, BLOCK_C)
    sumsq = tl.zeros([BLOCK_W], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c < C)[:, None] & inside[None, :]
        v = tl.load(x_row[None, :] + c.to(tl.int64)[:, None] * sxc, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # x + bias, rounded to x's dtype as torch's separate add does (zero where nothing loads)
            bias = tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)
            v = tl.where(mask, (v + bias[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        sumsq += tl.sum(v * v, axis=0)
    norm = tl.maximum(tl.sqrt_rn(sumsq), eps)  # F.normalize: x / max(||x||, eps)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        c_ok = c < C
        mask = c_ok[:, None] & inside[None, :]
        v = tl.load(x_row[None, :] + c.to(tl.int64)[:, None] * sxc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            v = tl.where(mask, (v + bias[:, None]).to(dt).to(tl.float32), 0.0)
        y = tl.math.div_rn(v, norm[None, :]).to(dt).to(tl.float32)  # .to(dtype) after the float32 normalize
        y = (y * scale).to(dt).to(tl.float32)  # * sqrt(C), rounded
        y = (y * g[:, None]).to(dt).to(tl.float32)  # * gamma, rounded
        if LIBDEVICE:
            e = libdevice.exp(-y)
        else:
            e = tl.exp(-y)
        y = tl.math.div_rn(y, 1.0 + e)  # SiLU as torch computes it: x / (1 + exp(-x))
        mask = c_ok[:, None] & (wp < WP)[None, :]
        tl.store(o_row[None, :] + c.to(tl.int64)[:, None] * soc, y.to(dt), mask=mask)


def _check(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float, eps: float, pad_h: int,
           pad_w: int, out: torch.Tensor) -> None:
    expect_float("x", x)
    if x.ndim != 5:
        raise InvalidArgumentError("x", f"expected a (batch, channels, frames, height, width) map, got shape "
                                        f"{tuple(x.shape)}")
    b, c, t, h, w = x.shape
    if tuple(gamma.shape) != (c,):
        raise InvalidArgumentError("gamma", f"expected shape ({c},), got {tuple(gamma.shape)}")
    expect_dtype("gamma", gamma, x.dtype)
    if bias is not None:
        if tuple(bias.shape) != (c,):
            raise InvalidArgumentError("bias", f"expected shape ({c},), got {tuple(bias.shape)}")
        expect_dtype("bias", bias, x.dtype)
    for name, value in (("scale", scale), ("eps", eps)):
        if not isinstance(value, float) or not value >= 0:
            raise InvalidArgumentError(name, f"expected a float >= 0, got {value!r}")
    for name, value in (("pad_h", pad_h), ("pad_w", pad_w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(name, f"expected an integer >= 0, got {value!r}")
    padded = (b, c, t, h + 2 * pad_h, w + 2 * pad_w)
    if tuple(out.shape) != padded:
        raise InvalidArgumentError("out", f"expected shape {padded} (x's with the zero border), got {tuple(out.shape)}")
    expect_dtype("out", out, x.dtype)
    expect_same_device({"x": x, "gamma": gamma, "bias": bias, "out": out})


def _channel_rms_norm_silu_into_ref(x, gamma, bias, scale, eps, pad_h, pad_w, out) -> None:
    y = channel_rms_norm_silu_ref(x, gamma, scale, eps, bias)
    out.copy_(F.pad(y, (pad_w, pad_w, pad_h, pad_h)))


@register_op("channel_rms_norm_silu", mutates_args=("out",), fake=_check, fallback=_channel_rms_norm_silu_into_ref)
def _channel_rms_norm_silu_launch(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                                  eps: float, pad_h: int, pad_w: int, out: torch.Tensor) -> None:
    _check(x, gamma, bias, scale, eps, pad_h, pad_w, out)
    if out.numel() == 0:
        return
    b, c, t, hp, wp = out.shape
    block_w = min(BLOCK_W, next_pow2(wp))
    block_c = min(BLOCK_C, next_pow2(c))
    channel_rms_norm_silu_kernel[(b * t * hp, cdiv(wp, block_w))](
        x, gamma, bias if bias is not None else gamma, out,
        c, t, x.shape[3], x.shape[4], hp, wp, pad_h, pad_w,
        *x.stride(), *out.stride(),
        scale, eps,
        HAS_BIAS=bias is not None, LIBDEVICE=not interpreting() and libdevice is not None, BLOCK_C=block_c,
        BLOCK_W=block_w, num_warps=4)


def channel_rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, eps: float = 1e-12,
                          pad_h: int = 0, pad_w: int = 0, out: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.diffc.channel_rms_norm_silu``: ``silu(F.normalize(x + bias, dim=1) * scale * gamma)`` of a 5-D
    map, with a zero border of ``pad_h`` rows and ``pad_w`` columns, into ``out`` (any strides) or a new tensor."""
    if out is None:
        b, c, t, h, w = x.shape
        out = torch.empty((b, c, t, h + 2 * pad_h, w + 2 * pad_w), dtype=x.dtype, device=x.device)
    torch.ops.diffc.channel_rms_norm_silu(x, gamma, bias, float(scale), float(eps), pad_h, pad_w, out)
    return out


# ---- (x + bias) + residual over a dense map in any memory layout ---------------------------------------------

BLOCK = 2048  # elements per program of channel_bias_residual


@triton_kernel
def channel_bias_residual_kernel(x_ptr, bias_ptr, res_ptr, out_ptr, n, C, stride_c, BLOCK: tl.constexpr):
    # x, res, out share one dense layout: storage offset i holds channel (i // stride_c) % C
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    dt = out_ptr.dtype.element_ty
    bias = tl.load(bias_ptr + (i // stride_c) % C, mask=mask, other=0.0).to(tl.float32)
    v = (tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32) + bias).to(dt).to(tl.float32)
    v = v + tl.load(res_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, v.to(dt), mask=mask)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its storage span exactly (a permutation of a contiguous layout)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return span == t.numel()


def _check_bias_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    expect_float("x", x)
    if x.ndim < 2:
        raise InvalidArgumentError("x", f"expected (batch, channels, ...) with channels at dim 1, got shape {tuple(x.shape)}")
    if tuple(bias.shape) != (x.shape[1],):
        raise InvalidArgumentError("bias", f"expected shape ({x.shape[1]},), got {tuple(bias.shape)}")
    for name, t in (("bias", bias), ("residual", residual), ("out", out)):
        expect_dtype(name, t, x.dtype)
    for name, t in (("residual", residual), ("out", out)):
        if tuple(t.shape) != tuple(x.shape):
            raise InvalidArgumentError(name, f"expected x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if not same_layout(t, x):
            raise InvalidArgumentError(name, f"expected x's memory layout (strides {x.stride()}), got {t.stride()}")
    if x.numel() > 1 and not _dense(x):
        raise InvalidArgumentError("x", f"expected a dense tensor (any dimension order), got strides {x.stride()}")
    expect_same_device({"x": x, "bias": bias, "residual": residual, "out": out})


def _channel_bias_residual_into_ref(x, bias, residual, out) -> None:
    out.copy_(channel_bias_residual_ref(x, bias, residual))


@register_op("channel_bias_residual", mutates_args=("out",), fake=_check_bias_residual,
             fallback=_channel_bias_residual_into_ref)
def _channel_bias_residual_launch(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                                  out: torch.Tensor) -> None:
    _check_bias_residual(x, bias, residual, out)
    n = x.numel()
    if n == 0:
        return
    stride_c = x.stride(1) if x.shape[1] > 1 else 1
    block = min(BLOCK, next_pow2(n))
    channel_bias_residual_kernel[(cdiv(n, block),)](x, bias, residual, out, n, x.shape[1], stride_c, BLOCK=block,
                                                    num_warps=4)


def channel_bias_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``torch.ops.diffc.channel_bias_residual``: ``(x + bias) + residual`` (bias per channel at dim 1) in one pass,
    rounded twice as the two torch adds are, into a new tensor of ``x``'s layout."""
    out = torch.empty_like(x)
    torch.ops.diffc.channel_bias_residual(x, bias, residual, out)
    return out
