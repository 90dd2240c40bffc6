"""Fused RMSNorm + RoPE on the query and key of self-attention, in both model layouts.

- FLUX (``FluxAttention``): per-head RMSNorm over ``head_dim`` (weight (D,)), heads moved before the
  sequence, then RoPE on interleaved channel pairs from the full-width (S, D) cos/sin tables that
  ``rope_tables`` gives (each frequency repeated twice). The double-stream block normalises text and
  image tokens with different weights and concatenates them along the sequence before RoPE, so the op
  writes its rows at ``seq_offset`` of a (B, H, S_total, D) buffer: two calls fill one joint buffer.
- Wan (``WanAttention``): RMSNorm across all heads over ``heads * head_dim`` (weight (H*D,)), then RoPE
  on interleaved pairs with the half-width (1, S, 1, D/2) tables of ``rope_frequencies``; the result
  stays (B, S, H, D), which the model transposes (a view) for attention.

As in eager, the normalised q/k is rounded to the activations' dtype before RoPE, which runs in
float32 and rounds once more. One kernel launch handles q and k.

The kernel also has a quantizing path (``QUANT``), which :mod:`.qk_norm_rope_fp8` registers as the
``_fp8`` variants that feed fp8 attention.

The kernel works on (tokens, heads, head_dim) tiles with head_dim contiguous, so every load and store is
a full row; RoPE partners come from a reshape/split/join in registers. Heads are tiled by a power of two
that divides H (FLUX 24 = 3 x 8, Wan 40 = 5 x 8), so no lanes pad to the next power of two; the Wan
norm loops over its head chunks twice (sum of squares, then normalise, rotate, store). Tile sizes come
from :func:`tile_plan` and a named :data:`CONFIGS` entry, picked with ``$DIFFC_QKROPE_CONFIG`` to time
variants on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import (
    cdiv,
    expect_dtype,
    expect_float,
    expect_same_device,
    expect_shape,
    expect_unit_last_stride,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)

RMS_NORM_EPS = 1e-6  # FLUX's NORM_EPS and Wan's config.eps



def qk_norm_rope_per_head_ref(q, k, q_weight, k_weight, cos, sin, eps: float = RMS_NORM_EPS, seq_offset: int = 0):
    """FLUX's math. q, k: (B, S, H, D); weights (D,); cos, sin: (S_total, D) fp32 -> (q, k) each (B, H, S, D).

    Rows ``seq_offset .. seq_offset + S`` of the tables rotate the S given tokens.
    """
    seq = q.shape[1]
    cos, sin = cos[seq_offset : seq_offset + seq], sin[seq_offset : seq_offset + seq]

    def one(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, x.shape[-1:], weight, eps).transpose(1, 2)  # (B, H, S, D)
        x_even, x_odd = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rot = torch.stack([-x_odd, x_even], dim=-1).flatten(3)
        return (x.float() * cos + x_rot.float() * sin).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


def qk_norm_rope_across_heads_ref(q, k, q_weight, k_weight, cos, sin, eps: float = RMS_NORM_EPS):
    """Wan's math. q, k: (B, S, H, D); weights (H*D,); cos, sin: (1, S, 1, D/2) or (S, D/2) fp32 -> (B, S, H, D)."""
    _batch, seq, heads, head_dim = q.shape
    cos, sin = cos.reshape(1, seq, 1, head_dim // 2), sin.reshape(1, seq, 1, head_dim // 2)

    def one(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x.flatten(2), (heads * head_dim,), weight, eps).unflatten(2, (heads, head_dim))
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


@triton_kernel
def qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, qs_ptr, ks_ptr,
    T, S, H, seq_offset, eps,
    si_b, si_s, si_h, so_b, so_s, so_h, st,
    D: tl.constexpr, ACROSS_HEADS: tl.constexpr, FULL_TABLE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    QUANT: tl.constexpr,
):
    # grid (cdiv(T, BLOCK_T), head blocks, 2): BLOCK_T of the T = B * S tokens of q (axis 2 == 0) or k (== 1)
    # tile (BLOCK_T, BLOCK_H, BLOCK_D): q, k (B, S, H, D) at strides (si_b, si_s, si_h, 1), D contiguous
    # per head: axis 1 picks BLOCK_H heads, one chunk; across heads: one head block, NUM_CHUNKS chunks of
    # BLOCK_H heads cover H, read twice (sum of squares, then normalise + rotate + store)
    # out: token (b, s) written at (b, s + seq_offset, h), strides (so_b, so_s, so_h, 1)
    # cos, sin: FULL_TABLE (S_total, D) at row s + seq_offset, column d; else (S, D/2) at row s, column d // 2
    # RoPE pairs channels (2j, 2j + 1): out[d] = n[d] * cos[d] + sign(d) * n[d ^ 1] * sin[d], sign(even) = -1
    # QUANT: out is float8_e4m3 and gets clamp(round_to_x_dtype(result) / scale[h], -448, 448); qs, ks: (H,) fp32
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]  # (BLOCK_T, 1, 1)
    b = (tok // S).to(tl.int64)  # 64-bit offsets: B * S * H * D can pass 2^31
    s = (tok % S).to(tl.int64)
    t = s + seq_offset
    hh = tl.arange(0, BLOCK_H)[None, :, None].to(tl.int64)  # (1, BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    tdm = (tok < T) & (d < D)
    if tl.program_id(2) == 0:
        x_ptr, w_ptr, o_ptr, s_ptr = q_ptr, qw_ptr, qo_ptr, qs_ptr
    else:
        x_ptr, w_ptr, o_ptr, s_ptr = k_ptr, kw_ptr, ko_ptr, ks_ptr
    x_row = x_ptr + b * si_b + s * si_s  # (BLOCK_T, 1, 1)
    o_row = o_ptr + b * so_b + t * so_s
    act = x_ptr.dtype.element_ty

    if FULL_TABLE:
        tab = t * st + d  # (BLOCK_T, 1, BLOCK_D)
        cos = tl.load(cos_ptr + tab, mask=tdm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + tab, mask=tdm, other=0.0).to(tl.float32)
        if SPLIT:
            cos_even, cos_odd = tl.split(tl.reshape(cos, (BLOCK_T, 1, BLOCK_D // 2, 2)))  # (BLOCK_T, 1, BLOCK_D/2)
            sin_even, sin_odd = tl.split(tl.reshape(sin, (BLOCK_T, 1, BLOCK_D // 2, 2)))
    elif SPLIT:
        j = tl.arange(0, BLOCK_D // 2)[None, None, :]
        tab = s * st + j  # (BLOCK_T, 1, BLOCK_D/2)
        cos_even = tl.load(cos_ptr + tab, mask=(tok < T) & (2 * j < D), other=0.0).to(tl.float32)
        sin_even = tl.load(sin_ptr + tab, mask=(tok < T) & (2 * j < D), other=0.0).to(tl.float32)
        cos_odd = cos_even
        sin_odd = sin_even
    else:
        tab = s * st + d // 2  # (BLOCK_T, 1, BLOCK_D)
        cos = tl.load(cos_ptr + tab, mask=tdm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + tab, mask=tdm, other=0.0).to(tl.float32)

    if ACROSS_HEADS:
        h0 = 0
        acc = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_D), dtype=tl.float32)
        for i in tl.static_range(NUM_CHUNKS):
            h = i * BLOCK_H + hh
            x = tl.load(x_row + h * si_h + d, mask=tdm & (h < H), other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=2), axis=1) / (H * D) + eps)[:, None, None]  # (BLOCK_T, 1, 1)
    else:
        h0 = tl.program_id(1) * BLOCK_H
    for i in tl.static_range(NUM_CHUNKS):
        h = h0 + i * BLOCK_H + hh  # (1, BLOCK_H, 1)
        mask = tdm & (h < H)
        x = tl.load(x_row + h * si_h + d, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H, BLOCK_D)
        if ACROSS_HEADS:
            w_at = h * D + d  # weight (H * D,)
        else:
            rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)[:, :, None]  # (BLOCK_T, BLOCK_H, 1)
            w_at = d  # weight (D,), shared by the heads
        w_at += 0 * tok  # (BLOCK_T, BLOCK_H, BLOCK_D) like x, so both get one layout (no shuffle of x)
        w = tl.load(w_ptr + w_at, mask=mask, other=0.0).to(tl.float32)
        n = (x * rstd * w).to(act).to(tl.float32)  # RMSNorm output in x's dtype
        if SPLIT:
            n_even, n_odd = tl.split(tl.reshape(n, (BLOCK_T, BLOCK_H, BLOCK_D // 2, 2)))
            out_even = n_even * cos_even - n_odd * sin_even
            out_odd = n_odd * cos_odd + n_even * sin_odd
            out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_T, BLOCK_H, BLOCK_D))
        else:
            x_pair = tl.load(x_row + h * si_h + (d ^ 1), mask=mask, other=0.0).to(tl.float32)
            w_pair = tl.load(w_ptr + (w_at ^ 1), mask=mask, other=0.0).to(tl.float32)
            n_pair = (x_pair * rstd * w_pair).to(act).to(tl.float32)
            out = n * cos + tl.where(d % 2 == 0, -n_pair, n_pair) * sin
        if QUANT:
            head_scale = tl.load(s_ptr + h, mask=h < H, other=1.0)  # (1, BLOCK_H, 1)
            out = tl.minimum(tl.maximum(out.to(act).to(tl.float32) / head_scale, -448.0), 448.0)
        tl.store(o_row + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=mask)


def _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, weight_shape, what, out_dtype) -> None:
    if q.ndim != 4 or q.shape[-1] % 2:
        raise InvalidArgumentError(
            "q", f"expected shape (batch, seq, heads, head_dim) with even head_dim, got {tuple(q.shape)}"
        )
    expect_float("q", q)
    expect_shape("k", k, tuple(q.shape), f"q's shape {tuple(q.shape)}")
    expect_dtype("k", k, q.dtype)
    named = (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin),
             ("q_out", q_out), ("k_out", k_out))
    for field, t in named:
        expect_unit_last_stride(field, t)
    expect_shape("q_weight", q_weight, weight_shape, what)
    expect_shape("k_weight", k_weight, weight_shape, what)
    expect_dtype("q_weight", q_weight, q.dtype)
    expect_dtype("k_weight", k_weight, q.dtype)
    expect_float("cos", cos)
    expect_shape("sin", sin, tuple(cos.shape), f"cos's shape {tuple(cos.shape)}")
    expect_dtype("q_out", q_out, out_dtype or q.dtype)
    expect_dtype("k_out", k_out, out_dtype or q.dtype)
    expect_same_device({"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight, "cos": cos, "sin": sin,
                        "q_out": q_out, "k_out": k_out})


def _check_per_head(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, out_dtype=None) -> None:
    batch, seq, heads, head_dim = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, (head_dim,), f"({head_dim},) (head_dim)",
                  out_dtype)
    if q_out.ndim != 4 or q_out.shape[:2] != (batch, heads) or q_out.shape[3] != head_dim:
        raise InvalidArgumentError(
            "q_out", f"expected shape ({batch}, {heads}, seq_total, {head_dim}), got {tuple(q_out.shape)}"
        )
    expect_shape("k_out", k_out, tuple(q_out.shape), f"q_out's shape {tuple(q_out.shape)}")
    total = q_out.shape[2]
    if seq_offset < 0 or seq_offset + seq > total:
        raise InvalidArgumentError(
            "seq_offset", f"rows {seq_offset}..{seq_offset + seq} must lie within seq_total={total}"
        )
    expect_shape("cos", cos, (total, head_dim), f"({total}, {head_dim}) (seq_total, head_dim)")
    _check_out_strides(q_out, k_out)


def _check_across_heads(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out, out_dtype=None) -> None:
    _batch, seq, heads, head_dim = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    inner = heads * head_dim
    _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, (inner,), f"({inner},) (heads * head_dim)",
                  out_dtype)
    expect_shape("q_out", q_out, tuple(q.shape))
    expect_shape("k_out", k_out, tuple(q.shape))
    if cos.numel() != seq * head_dim // 2 or cos.shape[-1] != head_dim // 2:
        half = head_dim // 2
        raise InvalidArgumentError(
            "cos", f"expected shape (1, {seq}, 1, {half}) or ({seq}, {half}), got {tuple(cos.shape)}"
        )
    _check_out_strides(q_out, k_out)


def _check_out_strides(q_out, k_out) -> None:
    if q_out.stride() != k_out.stride():
        raise InvalidArgumentError("k_out", f"must have q_out's strides {q_out.stride()}, got {k_out.stride()}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How :func:`tile_plan` shapes the kernel's (tokens, heads, head_dim) tile; see :data:`CONFIGS`."""

    tile: int = 2048  # elements of one tile (a power of two): tokens grow until tokens * heads * head_dim fill it
    max_heads: int = 8  # most heads in one tile
    pad_heads: bool = False  # heads per tile: next_pow2(H), else the largest power of two dividing H (>= 4)
    per_thread: int = 16  # tile elements per thread: num_warps = tile / (32 * per_thread), within 1..16
    split: bool = True  # RoPE partners by reshape/split/join in registers; False: a second load at d ^ 1


# Named variants to time on a GPU: DIFFC_QKROPE_CONFIG=<name> python -m bench.ops.bench_qk_norm_rope
CONFIGS = {
    "default": KernelConfig(),
    "xor": KernelConfig(split=False),
    "small": KernelConfig(tile=1024, per_thread=8),
    "warps8": KernelConfig(per_thread=8),
    "large": KernelConfig(tile=4096),
    "one-chunk": KernelConfig(tile=8192, max_heads=64, pad_heads=True),
}
CONFIG_ENV = "DIFFC_QKROPE_CONFIG"


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """One launch: BLOCK_T tokens x BLOCK_H heads x BLOCK_D channels a tile, in head_blocks x num_chunks."""

    block_t: int
    block_h: int
    block_d: int
    head_blocks: int  # grid axis 1 (per head); 1 across heads
    num_chunks: int  # head chunks one program loops over (across heads); 1 per head
    num_warps: int
    split: bool


def kernel_config() -> KernelConfig:
    """The :data:`CONFIGS` entry named by ``$DIFFC_QKROPE_CONFIG`` (``default`` when unset)."""
    name = os.environ.get(CONFIG_ENV) or "default"
    if name not in CONFIGS:
        raise InvalidArgumentError(CONFIG_ENV, f"expected one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]


@functools.lru_cache(maxsize=256)
def tile_plan(tokens: int, heads: int, head_dim: int, across_heads: bool, config: KernelConfig) -> TilePlan:
    """Tile sizes and warps for ``tokens`` (B * S) tokens of ``heads`` x ``head_dim``.

    Heads are never padded when H has a power-of-two factor of at least 4 (FLUX 24 -> 3 x 8, Wan 12 ->
    3 x 4, 40 -> 5 x 8); across heads one program loops over the chunks of its tokens' heads.
    """
    for field, value, least in (("tokens", tokens, 1), ("heads", heads, 1), ("head_dim", head_dim, 2),
                                ("config.max_heads", config.max_heads, 1), ("config.per_thread", config.per_thread, 1)):
        if value < least:
            raise InvalidArgumentError(field, f"expected an integer >= {least}, got {value}")
    if config.tile < 1 or config.tile & (config.tile - 1):
        raise InvalidArgumentError("config.tile", f"expected a power of two, got {config.tile}")
    block_d = next_pow2(head_dim)
    cap = max(1, min(config.max_heads, config.tile // block_d))
    cap = 1 << (cap.bit_length() - 1)
    exact, padded = min(heads & -heads, cap), min(next_pow2(heads), cap)
    block_h = padded if config.pad_heads or exact < min(4, padded) else exact
    block_t = min(max(1, config.tile // (block_h * block_d)), next_pow2(tokens))
    warps = block_t * block_h * block_d // (32 * config.per_thread)
    chunks = cdiv(heads, block_h)
    return TilePlan(
        block_t=block_t,
        block_h=block_h,
        block_d=block_d,
        head_blocks=1 if across_heads else chunks,
        num_chunks=chunks if across_heads else 1,
        num_warps=max(1, min(16, next_pow2(warps))),
        split=config.split,
    )


def _launch(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, across_heads,
            q_scale=None, k_scale=None) -> None:
    """One launch for q and k; with ``q_scale``/``k_scale`` the outputs are float8_e4m3 (the QUANT path)."""
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    batch, seq, heads, head_dim = q.shape
    if batch * seq * heads == 0:
        return
    # the kernel steps outputs by (b, s, h): per head they are (B, H, S, D) buffers, across heads (B, S, H, D)
    out_strides = ((q_out.stride(0), q_out.stride(2), q_out.stride(1)) if not across_heads
                   else (q_out.stride(0), q_out.stride(1), q_out.stride(2)))
    plan = tile_plan(batch * seq, heads, head_dim, across_heads, kernel_config())
    full_table = not across_heads
    table_rows = cos.shape[0] if full_table else seq
    cos, sin = cos.reshape(table_rows, -1), sin.reshape(table_rows, -1)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    quant = q_scale is not None
    qk_norm_rope_kernel[(cdiv(batch * seq, plan.block_t), plan.head_blocks, 2)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_scale if quant else cos, k_scale if quant else cos,
        batch * seq, seq, heads, seq_offset, eps,
        q.stride(0), q.stride(1), q.stride(2), *out_strides, cos.stride(0),
        D=head_dim, ACROSS_HEADS=across_heads, FULL_TABLE=full_table, SPLIT=plan.split,
        BLOCK_T=plan.block_t, BLOCK_H=plan.block_h, BLOCK_D=plan.block_d, NUM_CHUNKS=plan.num_chunks,
        QUANT=quant, num_warps=plan.num_warps,
    )


def _per_head_into_ref(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out) -> None:
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, q_weight, k_weight, cos, sin, eps, seq_offset)
    q_out[:, :, seq_offset : seq_offset + q.shape[1]] = q_ref
    k_out[:, :, seq_offset : seq_offset + q.shape[1]] = k_ref


def _across_heads_into_ref(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out) -> None:
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, q_weight, k_weight, cos, sin, eps)
    q_out.copy_(q_ref)
    k_out.copy_(k_ref)


@register_op(
    "qk_norm_rope_per_head", mutates_args=("q_out", "k_out"), fake=_check_per_head, fallback=_per_head_into_ref
)
def _per_head_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    seq_offset: int,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    _check_per_head(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, across_heads=False)


@register_op(
    "qk_norm_rope_across_heads",
    mutates_args=("q_out", "k_out"),
    fake=_check_across_heads,
    fallback=_across_heads_into_ref,
)
def _across_heads_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    _check_across_heads(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out, across_heads=True)


def qk_norm_rope_per_head(q, k, q_weight, k_weight, cos, sin, eps: float = RMS_NORM_EPS):
    """``torch.ops.diffc.qk_norm_rope_per_head`` into new buffers: q, k (B, S, H, D) -> (B, H, S, D) each."""
    batch, seq, heads, head_dim = q.shape
    q_out = q.new_empty(batch, heads, seq, head_dim)
    k_out = q.new_empty(batch, heads, seq, head_dim)
    torch.ops.diffc.qk_norm_rope_per_head(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out)
    return q_out, k_out


def qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos, sin, eps: float = RMS_NORM_EPS):
    """``torch.ops.diffc.qk_norm_rope_across_heads`` into new buffers: q, k (B, S, H, D) -> (B, S, H, D) each."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.diffc.qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
    return q_out, k_out
