"""The fp8 variants of the fused QK-norm + RoPE op, which feed fp8 attention (:mod:`.attention_fp8`).

``qk_norm_rope_per_head_fp8`` and ``qk_norm_rope_across_heads_fp8`` run :mod:`.qk_norm_rope`'s kernel on
its quantizing path: it divides the rounded result by a static per-head scale and stores float8_e4m3
(``x ~= out * scale[h]``), so q and k never round-trip through memory in bf16. The scales come from the
norm weights alone (:func:`qk_fp8_scales`): RMSNorm bounds its output. ``qk_fp8_head_scales`` computes
them for q and k in one launch, which is how compiled graphs get them (from the weights they run with).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError
from .fp8 import FP8, FP8_MAX, SCALE_FLOOR
from .qk_norm_rope import (
    RMS_NORM_EPS,
    _check_across_heads,
    _check_per_head,
    _launch,
    qk_norm_rope_across_heads_ref,
    qk_norm_rope_per_head_ref,
)
from .registry import (
    expect_dtype,
    expect_float,
    expect_same_device,
    expect_shape,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)

FP8_SCALE_SLACK = 1.01  # qk_fp8_scales' margin over the exact bound, for rounding to bf16 and cos^2 + sin^2 != 1


def quantize_with_head_scales(y: torch.Tensor, scale: torch.Tensor, head_axis: int) -> torch.Tensor:
    """The fp8 variants' quantization: ``clamp(y / scale[h], -448, 448)`` as float8_e4m3, y in the activations'
    dtype with its heads along ``head_axis``, scale float32 (H,); ``y ~= out * scale[h]``."""
    shape = [1] * y.ndim
    shape[head_axis] = -1
    return (y.float() / scale.reshape(shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def qk_fp8_scales(weight: torch.Tensor, heads: int, head_dim: int, across_heads: bool) -> torch.Tensor:
    """Static per-head dequantization scales, float32 (H,), for the q or k the fp8 variants produce.

    They depend on the RMSNorm weight alone, so they are computed once at compile time and no kernel has to
    reduce over the output before it can quantize it. The bound: RMSNorm over N channels (N = head_dim per
    head, heads * head_dim across heads) gives ``n_i = x_i * w_i / sqrt(mean(x^2) + eps)``, and since
    ``x_i^2 <= sum_j x_j^2 = N * mean(x^2)`` (eps only shrinks n), ``|n_i| <= sqrt(N) * |w_i|``, reached
    when channel i holds all the energy. RoPE rotates each pair (n_2j, n_2j+1), so an output is at most
    the pair's length: ``out^2 <= n_2j^2 + n_2j+1^2 <= max(w_2j^2, w_2j+1^2) * (x_2j^2 + x_2j+1^2) /
    mean(x^2) <= N * max(w^2)``. Hence ``|out| <= sqrt(N) * max|w|`` over the head's channels, for every
    input, and ``scale[h] = sqrt(N) * max|w| * FP8_SCALE_SLACK / 448`` never clips. The slack covers
    rounding n and out to bf16 (2^-9 relative each) and float32 tables with ``cos^2 + sin^2`` a few ulp
    over 1. The price of a bound over an estimate: typical outputs use a fraction of e4m3's range, which
    costs no relative precision while they stay above its normal minimum (2^-6 of 448 / scale).

    Args:
        weight: the RMSNorm weight of q or k: (head_dim,) per head (FLUX), (heads * head_dim,) across (Wan).
    """
    size = heads * head_dim if across_heads else head_dim
    expect_shape("weight", weight, (size,), f"({size},) ({'heads * head_dim' if across_heads else 'head_dim'})")
    w = weight.detach().float().abs()
    peak = w.reshape(heads, head_dim).amax(dim=1) if across_heads else w.amax().expand(heads)
    return (peak * (math.sqrt(size) * FP8_SCALE_SLACK / FP8_MAX)).clamp_min(SCALE_FLOOR).contiguous()


# --------------------------------------------------------------------------------------------------
# qk_fp8_head_scales: qk_fp8_scales of q's and k's norm weights in one launch (the graph's scale source)
# --------------------------------------------------------------------------------------------------


@triton_kernel
def qk_fp8_scales_kernel(qw_ptr, kw_ptr, qw2_ptr, kw2_ptr, qs_ptr, ks_ptr, H, D, factor,
                         HAS_SECOND: tl.constexpr, ACROSS_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (2 * H,): program i scales head i % H of q (i < H) or k; weights (H * D,) across heads, else (D,)
    h = tl.program_id(0) % H
    if tl.program_id(0) < H:
        w_ptr, w2_ptr, o_ptr = qw_ptr, qw2_ptr, qs_ptr
    else:
        w_ptr, w2_ptr, o_ptr = kw_ptr, kw2_ptr, ks_ptr
    d = tl.arange(0, BLOCK_D)
    at = h * D + d if ACROSS_HEADS else d
    peak = tl.max(tl.abs(tl.load(w_ptr + at, mask=d < D, other=0.0).to(tl.float32)), axis=0)
    if HAS_SECOND:
        peak = tl.maximum(peak, tl.max(tl.abs(tl.load(w2_ptr + at, mask=d < D, other=0.0).to(tl.float32)), axis=0))
    tl.store(o_ptr + h, tl.maximum(peak * factor, 1e-12))


def _expect_head_scales(heads: int, scales: dict[str, torch.Tensor]) -> None:
    """Per-head scale vectors: float32 (H,), contiguous."""
    for field, t in scales.items():
        expect_shape(field, t, (heads,), f"({heads},): one scale per head")
        expect_dtype(field, t, torch.float32)
        if not t.is_contiguous():
            raise InvalidArgumentError(field, "must be contiguous")


def _scale_weight_size(heads: int, head_dim: int, across_heads: bool) -> int:
    return heads * head_dim if across_heads else head_dim


def _check_scale_op(q_weight, k_weight, q_weight2, k_weight2, heads, head_dim, across_heads, q_scale_out,
                    k_scale_out) -> None:
    if heads < 1 or head_dim < 1:
        raise InvalidArgumentError("heads", f"heads and head_dim must be positive, got {heads} and {head_dim}")
    size = _scale_weight_size(heads, head_dim, across_heads)
    what = f"({size},) ({'heads * head_dim' if across_heads else 'head_dim'})"
    if (q_weight2 is None) != (k_weight2 is None):
        raise InvalidArgumentError("k_weight2" if k_weight2 is None else "q_weight2",
                                   "give the second weights of both q and k (a buffer two norms write), or neither")
    named = (("q_weight", q_weight), ("k_weight", k_weight), ("q_weight2", q_weight2), ("k_weight2", k_weight2))
    for field, t in named:
        if t is not None:
            expect_shape(field, t, (size,), what)
            expect_float(field, t)
            if not t.is_contiguous():
                raise InvalidArgumentError(field, "must be contiguous")
    _expect_head_scales(heads, {"q_scale_out": q_scale_out, "k_scale_out": k_scale_out})
    expect_same_device({"q_weight": q_weight, "k_weight": k_weight, "q_weight2": q_weight2, "k_weight2": k_weight2,
                        "q_scale_out": q_scale_out, "k_scale_out": k_scale_out})


def _scale_op_ref(q_weight, k_weight, q_weight2, k_weight2, heads, head_dim, across_heads, q_scale_out,
                  k_scale_out) -> None:
    for out, first, second in ((q_scale_out, q_weight, q_weight2), (k_scale_out, k_weight, k_weight2)):
        scale = qk_fp8_scales(first, heads, head_dim, across_heads)
        if second is not None:
            scale = torch.maximum(scale, qk_fp8_scales(second, heads, head_dim, across_heads))
        out.copy_(scale)


@register_op("qk_fp8_head_scales", mutates_args=("q_scale_out", "k_scale_out"), fake=_check_scale_op,
             fallback=_scale_op_ref)
def _scale_op_launch(q_weight: torch.Tensor, k_weight: torch.Tensor, q_weight2: torch.Tensor | None,
                     k_weight2: torch.Tensor | None, heads: int, head_dim: int, across_heads: bool,
                     q_scale_out: torch.Tensor, k_scale_out: torch.Tensor) -> None:
    """:func:`qk_fp8_scales` of q's and k's norm weights (the larger of two weights' where two norms write one
    buffer, FLUX's text and image tokens) into ``q_scale_out``/``k_scale_out``, in one launch."""
    _check_scale_op(q_weight, k_weight, q_weight2, k_weight2, heads, head_dim, across_heads, q_scale_out,
                    k_scale_out)
    size = _scale_weight_size(heads, head_dim, across_heads)
    second = q_weight2 is not None
    qk_fp8_scales_kernel[(2 * heads,)](
        q_weight, k_weight, q_weight2 if second else q_weight, k_weight2 if second else k_weight,
        q_scale_out, k_scale_out,
        heads, head_dim, math.sqrt(size) * FP8_SCALE_SLACK / FP8_MAX,
        HAS_SECOND=second, ACROSS_HEADS=across_heads, BLOCK_D=next_pow2(head_dim), num_warps=1,
    )


def _check_head_scales(q, q_scale, k_scale) -> None:
    """The fp8 variants' static dequantization scales: float32 (H,), contiguous, on q's device."""
    _expect_head_scales(q.shape[2] if q.ndim == 4 else 0, {"q_scale": q_scale, "k_scale": k_scale})
    expect_same_device({"q": q, "q_scale": q_scale, "k_scale": k_scale})


def _check_per_head_fp8(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_scale, k_scale, q_out,
                        k_out) -> None:
    _check_per_head(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, out_dtype=FP8)
    _check_head_scales(q, q_scale, k_scale)


def _check_across_heads_fp8(q, k, q_weight, k_weight, cos, sin, eps, q_scale, k_scale, q_out, k_out) -> None:
    _check_across_heads(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out, out_dtype=FP8)
    _check_head_scales(q, q_scale, k_scale)


def _per_head_fp8_into_ref(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_scale, k_scale, q_out,
                           k_out) -> None:
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, q_weight, k_weight, cos, sin, eps, seq_offset)
    q_out[:, :, seq_offset : seq_offset + q.shape[1]] = quantize_with_head_scales(q_ref, q_scale, head_axis=1)
    k_out[:, :, seq_offset : seq_offset + q.shape[1]] = quantize_with_head_scales(k_ref, k_scale, head_axis=1)


def _across_heads_fp8_into_ref(q, k, q_weight, k_weight, cos, sin, eps, q_scale, k_scale, q_out, k_out) -> None:
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, q_weight, k_weight, cos, sin, eps)
    q_out.copy_(quantize_with_head_scales(q_ref, q_scale, head_axis=2))
    k_out.copy_(quantize_with_head_scales(k_ref, k_scale, head_axis=2))


@register_op(
    "qk_norm_rope_per_head_fp8",
    mutates_args=("q_out", "k_out"),
    fake=_check_per_head_fp8,
    fallback=_per_head_fp8_into_ref,
)
def _per_head_fp8_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    seq_offset: int,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    _check_per_head_fp8(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_scale, k_scale, q_out, k_out)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, seq_offset, q_out, k_out, across_heads=False,
            q_scale=q_scale, k_scale=k_scale)


@register_op(
    "qk_norm_rope_across_heads_fp8",
    mutates_args=("q_out", "k_out"),
    fake=_check_across_heads_fp8,
    fallback=_across_heads_fp8_into_ref,
)
def _across_heads_fp8_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    _check_across_heads_fp8(q, k, q_weight, k_weight, cos, sin, eps, q_scale, k_scale, q_out, k_out)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out, across_heads=True,
            q_scale=q_scale, k_scale=k_scale)


def qk_norm_rope_per_head_fp8(q, k, q_weight, k_weight, cos, sin, q_scale, k_scale, eps: float = RMS_NORM_EPS):
    """``torch.ops.diffc.qk_norm_rope_per_head_fp8`` into new buffers: q, k (B, S, H, D) -> fp8 (B, H, S, D) each."""
    batch, seq, heads, head_dim = q.shape
    q_out = torch.empty(batch, heads, seq, head_dim, dtype=FP8, device=q.device)
    k_out = torch.empty(batch, heads, seq, head_dim, dtype=FP8, device=q.device)
    torch.ops.diffc.qk_norm_rope_per_head_fp8(q, k, q_weight, k_weight, cos, sin, eps, 0, q_scale, k_scale,
                                              q_out, k_out)
    return q_out, k_out


def qk_norm_rope_across_heads_fp8(q, k, q_weight, k_weight, cos, sin, q_scale, k_scale, eps: float = RMS_NORM_EPS):
    """``torch.ops.diffc.qk_norm_rope_across_heads_fp8`` into new buffers: q, k (B, S, H, D) -> fp8 (B, S, H, D)."""
    q_out = torch.empty(q.shape, dtype=FP8, device=q.device)
    k_out = torch.empty(q.shape, dtype=FP8, device=q.device)
    torch.ops.diffc.qk_norm_rope_across_heads_fp8(q, k, q_weight, k_weight, cos, sin, eps, q_scale, k_scale,
                                                  q_out, k_out)
    return q_out, k_out
