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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import (
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
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    S, H, P, seq_offset, eps,
    si_b, si_s, si_h, so_b, so_s, so_h, st,
    ACROSS_HEADS: tl.constexpr, FULL_TABLE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grid (B * S, 2): one token (b, s) of q (axis 1 == 0) or k (== 1), all heads at once
    # q, k: (B, S, H, D = 2P), strides (si_b, si_s, si_h, 1); pair p holds channels (2p, 2p + 1)
    # out: row s + seq_offset, strides (so_b, so_s, so_h, 1) in (b, s, h) order
    # cos, sin: FULL_TABLE (S_total, D) read at 2p and 2p + 1; else (S, P) read at p; row stride st
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * S * C can pass 2^31
    b = row // S
    s = row % S
    if tl.program_id(1) == 0:
        x_ptr, w_ptr, o_ptr = q_ptr, qw_ptr, qo_ptr
    else:
        x_ptr, w_ptr, o_ptr = k_ptr, kw_ptr, ko_ptr
    h = tl.arange(0, BLOCK_H)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    pm = p < P
    mask = (h < H) & pm
    src = x_ptr + b * si_b + s * si_s + h * si_h + 2 * p
    x_even = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_P)
    x_odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    sq = x_even * x_even + x_odd * x_odd
    if ACROSS_HEADS:
        rstd = tl.rsqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (2 * P * H) + eps)
        w_src = w_ptr + h * (2 * P) + 2 * p  # weight (H * D,): (BLOCK_H, BLOCK_P)
        w_mask = mask
    else:
        rstd = tl.rsqrt(tl.sum(sq, axis=1)[:, None] / (2 * P) + eps)  # (BLOCK_H, 1)
        w_src = w_ptr + 2 * p  # weight (D,): (1, BLOCK_P), shared by the heads
        w_mask = pm
    w_even = tl.load(w_src, mask=w_mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_src + 1, mask=w_mask, other=0.0).to(tl.float32)
    act = x_ptr.dtype.element_ty
    n_even = (x_even * rstd * w_even).to(act).to(tl.float32)  # RMSNorm output in x's dtype
    n_odd = (x_odd * rstd * w_odd).to(act).to(tl.float32)
    t = s + seq_offset
    if FULL_TABLE:
        cos_even = tl.load(cos_ptr + t * st + 2 * p, mask=pm, other=0.0).to(tl.float32)  # (1, BLOCK_P)
        cos_odd = tl.load(cos_ptr + t * st + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
        sin_even = tl.load(sin_ptr + t * st + 2 * p, mask=pm, other=0.0).to(tl.float32)
        sin_odd = tl.load(sin_ptr + t * st + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    else:
        cos_even = tl.load(cos_ptr + t * st + p, mask=pm, other=0.0).to(tl.float32)
        sin_even = tl.load(sin_ptr + t * st + p, mask=pm, other=0.0).to(tl.float32)
        cos_odd = cos_even
        sin_odd = sin_even
    out_even = n_even * cos_even - n_odd * sin_even
    out_odd = n_odd * cos_odd + n_even * sin_odd
    dst = o_ptr + b * so_b + t * so_s + h * so_h + 2 * p
    tl.store(dst, out_even.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + 1, out_odd.to(o_ptr.dtype.element_ty), mask=mask)


def _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, weight_shape, what) -> None:
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
    expect_dtype("q_out", q_out, q.dtype)
    expect_dtype("k_out", k_out, q.dtype)
    expect_same_device({"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight, "cos": cos, "sin": sin,
                        "q_out": q_out, "k_out": k_out})


def _check_per_head(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out) -> None:
    batch, seq, heads, head_dim = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, (head_dim,), f"({head_dim},) (head_dim)")
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


def _check_across_heads(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out) -> None:
    _batch, seq, heads, head_dim = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    inner = heads * head_dim
    _check_common(q, k, q_weight, k_weight, cos, sin, q_out, k_out, (inner,), f"({inner},) (heads * head_dim)")
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


def _launch(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, out_strides, across_heads) -> None:
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    batch, seq, heads, head_dim = q.shape
    block_h, block_p = next_pow2(heads), next_pow2(head_dim // 2)
    full_table = not across_heads
    table_rows = cos.shape[0] if full_table else seq
    cos, sin = cos.reshape(table_rows, -1), sin.reshape(table_rows, -1)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qk_norm_rope_kernel[(batch * seq, 2)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,
        seq, heads, head_dim // 2, seq_offset, eps,
        q.stride(0), q.stride(1), q.stride(2), *out_strides, cos.stride(0),
        ACROSS_HEADS=across_heads, FULL_TABLE=full_table, BLOCK_H=block_h, BLOCK_P=block_p,
        num_warps=max(1, min(8, block_h * block_p // 512)),
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
    strides = (q_out.stride(0), q_out.stride(2), q_out.stride(1))  # (b, s, h) of a (B, H, S, D) buffer
    _launch(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, strides, across_heads=False)


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
    strides = (q_out.stride(0), q_out.stride(1), q_out.stride(2))
    _launch(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out, strides, across_heads=True)


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
