"""Group norm (+ SiLU) of a feature map in any memory layout: ``diffc::group_norm``.

The 2-D KL autoencoders (FLUX.1, Stable Diffusion, Z-Image) run ``GroupNorm(32)`` and SiLU before most of
their convolutions. torch's CUDA group norm reduces each (sample, group) row in one thread block: 32 blocks
for a batch-1 decode, each reducing up to 4 M values, so the norms alone took 46 of the 89 ms of a FLUX.1
1024² decode on an H100 (``bench/results/h100-2026-12-06-flux-vae-probe.md``); and on a channels-last map it
copies the input to the contiguous layout first. This op splits each row's reduction over the whole GPU:

1. ``group_norm_partials_kernel``: every program reduces a run of pixels for a block of channels to per-channel
   mean and sum of squared deviations (Chan's pairwise update across its chunks: no cancellation);
2. ``group_norm_stats_kernel``: one program per (sample, group) merges its channels' partials into the group's
   mean and 1/std;
3. ``group_norm_apply_kernel``: ``x * a + b`` per channel (``a = rstd * weight``, ``b = bias - mean * a``, as
   torch's kernel computes it, from the mean and 1/std rounded to x's dtype, as torch's CUDA group norm keeps
   them), rounded to x's dtype, then SiLU (as torch applies it to the rounded norm).

An optional ``in_bias`` (the producing convolution's bias, per channel) is added first and rounded to x's
dtype, as torch's separate add after cuDNN's convolution rounds it, in the partials and in the apply pass: the
convolution then runs without its bias and no pass of its own adds it. A map is (batch, channels, ...): its
spatial dimensions are read as one pixel dimension (a view where they merge, as in a contiguous or a channels-last
map; a copy otherwise), so the kernels see one pixel stride, and their loads run along whichever of channels
(channels-last) or pixels (channels-first) is contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import (cdiv, expect_dtype, expect_float, expect_same_device, interpreting, libdevice, next_pow2,
                       register_op, tl, triton_kernel)

BLOCK_P = 64  # pixels per chunk of the partials and per program of the apply pass
BLOCK_C = 128  # channels per program
PROGRAMS = 1024  # programs the partials pass aims for over a whole map (several waves of any GPU's SMs)
BLOCK_S = 64  # partial rows merged per step of the stats pass


def group_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                   eps: float, silu: bool, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(F.group_norm(x + in_bias, groups, weight, bias, eps))`` in x's dtype and layout, rounded where torch's
    CUDA kernels round: the sum ``x + in_bias``; the float32 mean and 1/std, stored in x's dtype
    (``native_group_norm`` returns them so); ``x * a + b`` (``a = rstd * weight``, ``b = bias - mean * a``); SiLU.
    (torch's CPU kernel keeps the statistics in float32: its bf16 results can differ by a rounding.)"""
    spatial = [1] * (x.dim() - 2)
    if in_bias is not None:
        x = x + in_bias.view(1, -1, *spatial)
    b, c = x.shape[:2]
    rows = x.float().reshape(b, groups, -1)
    mean = rows.mean(-1).to(x.dtype).float()
    rstd = torch.rsqrt(rows.var(-1, unbiased=False) + eps).to(x.dtype).float()
    a = rstd.repeat_interleave(c // groups, dim=1)  # (b, c)
    if weight is not None:
        a = a * weight.float()
    shift = -a * mean.repeat_interleave(c // groups, dim=1)
    if bias is not None:
        shift = shift + bias.float()
    y = (x.float() * a.view(b, c, *spatial) + shift.view(b, c, *spatial)).to(x.dtype)
    return F.silu(y) if silu else y


@triton_kernel
def group_norm_partials_kernel(
    x_ptr, in_bias_ptr, mean_ptr, m2_ptr,
    C, HW, PIX, S,
    sxb, sxc, sxp,
    HAS_IN_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (S, B, cdiv(C, BLOCK_C)); one program: pixels [s * PIX, (s + 1) * PIX) of sample b, BLOCK_C channels
    s = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_base = x_ptr + b.to(tl.int64) * sxb + c.to(tl.int64)[None, :] * sxc
    if HAS_IN_BIAS:
        inb = tl.load(in_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    dt = x_ptr.dtype.element_ty
    start = s * PIX
    end = tl.minimum(start + PIX, HW)
    n = tl.zeros([BLOCK_C], dtype=tl.float32)  # pixels merged so far (the same for every channel)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        mask = p_ok[:, None] & c_ok[None, :]
        v = tl.load(x_base + p.to(tl.int64)[:, None] * sxp, mask=mask, other=0.0).to(tl.float32)
        if HAS_IN_BIAS:
            v = (v + inb[None, :]).to(dt).to(tl.float32)
        k = tl.sum(p_ok.to(tl.float32), axis=0)
        chunk_mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / k
        d = tl.where(mask, v - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(d * d, axis=0)
        total = n + k
        delta = chunk_mean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta * delta * (n * k / total)
        n = total
    row = (b.to(tl.int64) * S + s) * C
    tl.store(mean_ptr + row + c, mean, mask=c_ok)
    tl.store(m2_ptr + row + c, m2, mask=c_ok)


@triton_kernel
def group_norm_stats_kernel(
    mean_ptr, m2_ptr, gmean_ptr, grstd_ptr,
    C, G, HW, PIX, S, eps,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    # grid (B * G,); one program: the partials of one (sample, group) -> its mean and 1 / std
    bg = tl.program_id(0)
    b = bg // G
    g = bg - b * G
    cpg = C // G
    cs = tl.arange(0, BLOCK_CG)
    c_ok = cs < cpg
    base = b.to(tl.int64) * S * C + g * cpg
    n_all = HW.to(tl.float32) * cpg
    acc = tl.zeros([BLOCK_S, BLOCK_CG], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_ok[None, :]
        n_s = tl.minimum(tl.maximum(HW - s * PIX, 0), PIX).to(tl.float32)  # pixels of partial row s
        m = tl.load(mean_ptr + base + s.to(tl.int64)[:, None] * C + cs[None, :], mask=mask, other=0.0)
        acc += tl.where(mask, m * n_s[:, None], 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n_all
    acc = tl.zeros([BLOCK_S, BLOCK_CG], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_ok[None, :]
        n_s = tl.minimum(tl.maximum(HW - s * PIX, 0), PIX).to(tl.float32)
        offs = base + s.to(tl.int64)[:, None] * C + cs[None, :]
        m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        d = m - mean
        acc += tl.where(mask, q + d * d * n_s[:, None], 0.0)
    var = tl.maximum(tl.sum(tl.sum(acc, axis=1), axis=0) / n_all, 0.0)
    tl.store(gmean_ptr + bg, mean)
    tl.store(grstd_ptr + bg, 1.0 / tl.sqrt_rn(var + eps))


@triton_kernel
def group_norm_apply_kernel(
    x_ptr, w_ptr, bias_ptr, in_bias_ptr, gmean_ptr, grstd_ptr, out_ptr,
    C, G, HW,
    sxb, sxc, sxp, sob, soc, sop,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_BIAS: tl.constexpr, SILU: tl.constexpr,
    LIBDEVICE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (cdiv(HW, BLOCK_P), B, cdiv(C, BLOCK_C)) (the pixel tiles first: a grid's first dimension is the one
    # that takes more than 65535 programs); one program: a tile of pixels x channels
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < HW
    c_ok = c < C
    mask = p_ok[:, None] & c_ok[None, :]
    cpg = C // G
    g = b * G + c // cpg
    dt = out_ptr.dtype.element_ty
    mean = tl.load(gmean_ptr + g, mask=c_ok, other=0.0).to(dt).to(tl.float32)  # kept in x's dtype, as torch does
    rstd = tl.load(grstd_ptr + g, mask=c_ok, other=0.0).to(dt).to(tl.float32)
    if HAS_WEIGHT:
        a = rstd * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        a = rstd
    shift = -mean * a
    if HAS_BIAS:
        shift += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    x_offs = b.to(tl.int64) * sxb + p.to(tl.int64)[:, None] * sxp + c.to(tl.int64)[None, :] * sxc
    v = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_BIAS:
        v = (v + tl.load(in_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    y = (v * a[None, :] + shift[None, :]).to(dt).to(tl.float32)
    if SILU:
        if LIBDEVICE:
            e = libdevice.exp(-y)
        else:
            e = tl.exp(-y)
        y = tl.math.div_rn(y, 1.0 + e)  # SiLU as torch computes it: x / (1 + exp(-x))
    o_offs = b.to(tl.int64) * sob + p.to(tl.int64)[:, None] * sop + c.to(tl.int64)[None, :] * soc
    tl.store(out_ptr + o_offs, y.to(dt), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, in_bias: torch.Tensor | None,
           groups: int, eps: float, silu: bool, out: torch.Tensor) -> None:
    expect_float("x", x)
    if x.ndim < 2:
        raise InvalidArgumentError("x", f"expected a (batch, channels, ...) map, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c % groups:
        raise InvalidArgumentError("groups", f"expected a positive integer dividing the {c} channels, got {groups!r}")
    for name, t in (("weight", weight), ("bias", bias), ("in_bias", in_bias)):
        if t is None:
            continue
        if tuple(t.shape) != (c,):
            raise InvalidArgumentError(name, f"expected shape ({c},), got {tuple(t.shape)}")
        expect_dtype(name, t, x.dtype)
    if not isinstance(eps, float) or not eps >= 0:
        raise InvalidArgumentError("eps", f"expected a float >= 0, got {eps!r}")
    if not isinstance(silu, bool):
        raise InvalidArgumentError("silu", f"expected a bool, got {silu!r}")
    if tuple(out.shape) != tuple(x.shape):
        raise InvalidArgumentError("out", f"expected x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    expect_dtype("out", out, x.dtype)
    expect_same_device({"x": x, "weight": weight, "bias": bias, "in_bias": in_bias, "out": out})


def _group_norm_into_ref(x, weight, bias, in_bias, groups, eps, silu, out) -> None:
    out.copy_(group_norm_ref(x, weight, bias, groups, eps, silu, in_bias))


def splits(batch: int, hw: int, channel_blocks: int) -> tuple[int, int]:
    """(rows S, pixels per row PIX) of the partials pass: about :data:`PROGRAMS` programs over the map, each at
    least one :data:`BLOCK_P` chunk of pixels, PIX a multiple of it."""
    chunks = cdiv(hw, BLOCK_P)
    s = max(1, min(chunks, cdiv(PROGRAMS, max(1, batch * channel_blocks))))
    pix = cdiv(chunks, s) * BLOCK_P
    return cdiv(hw, pix), pix


@register_op("group_norm", mutates_args=("out",), fake=_check, fallback=_group_norm_into_ref)
def _group_norm_launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       in_bias: torch.Tensor | None, groups: int, eps: float, silu: bool, out: torch.Tensor) -> None:
    _check(x, weight, bias, in_bias, groups, eps, silu, out)
    if out.numel() == 0:
        return
    b, c = x.shape[:2]
    hw = out[0, 0].numel()  # the pixels (any number of spatial dimensions, flattened)
    xf = x.reshape(b, c, hw)  # a view where the spatial dimensions merge (contiguous, channels-last), else a copy
    try:
        of, through_copy = out.view(b, c, hw), False
    except RuntimeError:  # a destination whose spatial dimensions do not merge: written through a copy
        of, through_copy = torch.empty((b, c, hw), dtype=out.dtype, device=out.device), True
    block_c = min(BLOCK_C, next_pow2(c))
    n_cb = cdiv(c, block_c)
    s, pix = splits(b, hw, n_cb)
    mean = torch.empty((b, s, c), dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    group_mean = torch.empty((b * groups,), dtype=torch.float32, device=x.device)
    group_rstd = torch.empty_like(group_mean)
    anything = xf  # a valid pointer for the arguments a specialization never reads
    group_norm_partials_kernel[(s, b, n_cb)](
        xf, in_bias if in_bias is not None else anything, mean, m2,
        c, hw, pix, s, *xf.stride(),
        HAS_IN_BIAS=in_bias is not None, BLOCK_P=BLOCK_P, BLOCK_C=block_c, num_warps=4)
    group_norm_stats_kernel[(b * groups,)](
        mean, m2, group_mean, group_rstd, c, groups, hw, pix, s, eps,
        BLOCK_S=min(BLOCK_S, next_pow2(s)), BLOCK_CG=next_pow2(c // groups), num_warps=4)
    group_norm_apply_kernel[(cdiv(hw, BLOCK_P), b, n_cb)](
        xf, weight if weight is not None else anything, bias if bias is not None else anything,
        in_bias if in_bias is not None else anything, group_mean, group_rstd, of,
        c, groups, hw, *xf.stride(), *of.stride(),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_IN_BIAS=in_bias is not None, SILU=silu,
        LIBDEVICE=not interpreting() and libdevice is not None, BLOCK_P=BLOCK_P, BLOCK_C=block_c, num_warps=4)
    if through_copy:
        out.copy_(of.view(out.shape))


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, silu: bool = False, in_bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.diffc.group_norm``: ``[silu](F.group_norm(x [+ in_bias], groups, weight, bias, eps))`` of a
    (batch, channels, ...) map (images, videos, token rows), into ``out`` (any strides) or a new tensor of x's
    memory layout."""
    if out is None:
        out = torch.empty_like(x)
    torch.ops.diffc.group_norm(x, weight, bias, in_bias, int(groups), float(eps), bool(silu), out)
    return out
