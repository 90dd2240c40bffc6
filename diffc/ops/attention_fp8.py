"""fp8 attention on Hopper: ``torch.ops.diffc.quantize_heads`` and ``torch.ops.diffc.attention_flashinfer_fp8``.

flashinfer's FA3 kernel runs attention on float8_e4m3 q, k, v with one float32 dequantization scale per
head (GPU-NOTES.md: 1.3x bf16 FA3 at Wan's and FLUX's sizes), provided q, k and v arrive in fp8 without
a separate quantization pass, which costs more than fp8 saves. q and k come from the fused QK-norm +
RoPE's fp8 variants with static scales (:func:`diffc.ops.qk_norm_rope_fp8.qk_fp8_scales`); v, which no norm
bounds, gets dynamic scales from :func:`quantize_heads` (two passes over v: amax, then cast).

Scale convention, for all three: ``x[b, h] ~= x8[b, h].float() * scale``, where a scale tensor is either
(H,), one scale per head shared by the batch items (the static q/k scales), or (B, H), one per batch
item and head (what ``quantize_heads`` writes for v). Both are float32 and contiguous; flashinfer gets
``scale`` or ``scale[b]`` for batch item b.

Layout as in :mod:`.attention_flashinfer`: q, k, v are (B, H, S, D) as SDPA's, transposed views of
(B, S, H, D) buffers, and the bf16 output is a (B, H, S_q, D) view of a (B, S_q, H, D) tensor. FA3 takes
head_dim 64, 128 or 256 (the caller lowers onto this op only there). Without a Hopper GPU or flashinfer
the op runs its reference: dequantize, SDPA in float32, cast to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .attention_fa4 import bshd_output
from .attention_flashinfer import flashinfer_unavailable
from .fp8 import FP8, FP8_MAX, SCALE_FLOOR
from .qk_norm_rope import KernelConfig, tile_plan
from .registry import (
    cdiv,
    expect_dtype,
    expect_float,
    expect_same_device,
    expect_shape,
    expect_unit_last_stride,
    register_op,
    tl,
    triton_kernel,
)

OUT_DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# quantize_heads: x (B, S, H, D) -> fp8 (B, S, H, D) + float32 (B, H) scales
# ---------------------------------------------------------------------------------------------


def quantize_heads_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, H, D) -> (fp8 (B, S, H, D), float32 (B, H)): scale = amax over (S, D) / 448, floor 1e-12."""
    xf = x.float()
    scale = xf.abs().amax(dim=(1, 3)).clamp_min(SCALE_FLOOR) / FP8_MAX  # (B, H)
    return (xf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton_kernel
def quantize_heads_kernel(
    x_ptr, y_ptr, out_ptr, scale_ptr,
    S, S_X, H, sx_b, sx_s, sx_h, sy_b, sy_s, sy_h,
    D: tl.constexpr, CAST: tl.constexpr, CAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid (cdiv(S, BLOCK_T), cdiv(H, BLOCK_H), B): tile (BLOCK_T, BLOCK_H, BLOCK_D) of batch item b
    # x: (B, S, H, D) at strides (sx_b, sx_s, sx_h, 1); out: fp8 (B, S, H, D) contiguous; scale: (B, H) fp32
    # CAT: the rows are the concatenation along the sequence of x (its S_X rows) and y (the S - S_X after them,
    #   at strides (sy_b, sy_s, sy_h, 1)), read where they are (no concatenated copy)
    # not CAST: atomic max of max(amax, 1e-12) / 448 into scale (zeroed); both maps are monotonic, so the
    #   result is exactly the max over tiles of amax, floored and divided; CAST: out = clamp(x / scale[b, h])
    b = tl.program_id(2).to(tl.int64)
    s = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]).to(tl.int64)  # (BLOCK_T, 1, 1)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]  # (1, BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    mask = (s < S) & (h < H) & (d < D)
    if CAT:
        in_x = s < S_X
        xa = tl.load(x_ptr + b * sx_b + s * sx_s + h * sx_h + d, mask=mask & in_x, other=0.0)
        xb = tl.load(y_ptr + b * sy_b + (s - S_X) * sy_s + h * sy_h + d, mask=mask & (s >= S_X), other=0.0)
        x = tl.where(in_x, xa, xb).to(tl.float32)
    else:
        x = tl.load(x_ptr + b * sx_b + s * sx_s + h * sx_h + d, mask=mask, other=0.0).to(tl.float32)
    if CAST:
        scale = tl.load(scale_ptr + b * H + h, mask=h < H, other=1.0)  # (1, BLOCK_H, 1)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(out_ptr + ((b * S + s) * H + h) * D + d, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=2), axis=0)  # (BLOCK_H,)
        hv = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        tl.atomic_max(scale_ptr + b * H + hv, tl.maximum(amax, 1e-12) / 448.0, mask=hv < H)


def _check_heads(field: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise InvalidArgumentError(field, f"expected shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    expect_float(field, x)
    if x.dtype == FP8:
        raise InvalidArgumentError(field, "is already float8_e4m3fn")
    expect_unit_last_stride(field, x)


def _check_outputs(shape: tuple[int, ...], out: torch.Tensor, out_scale: torch.Tensor) -> None:
    expect_shape("out", out, shape)
    expect_dtype("out", out, FP8)
    batch, _seq, heads, _dim = shape
    expect_shape("out_scale", out_scale, (batch, heads), f"({batch}, {heads}): one scale per batch item and head")
    expect_dtype("out_scale", out_scale, torch.float32)
    for field, t in (("out", out), ("out_scale", out_scale)):
        if not t.is_contiguous():
            raise InvalidArgumentError(field, "must be contiguous")


def _check_quantize_heads(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_heads("x", x)
    _check_outputs(tuple(x.shape), out, out_scale)
    expect_same_device({"x": x, "out": out, "out_scale": out_scale})


def _quantize_heads_into_ref(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    if x.numel() == 0:
        out_scale.fill_(SCALE_FLOOR / FP8_MAX)
        return
    q, scale = quantize_heads_ref(x)
    out.copy_(q)
    out_scale.copy_(scale)


# The (tokens, heads, head_dim) tile of both passes: 8192 elements, 32 a thread (FLUX.1's v: 8 tokens x 8 heads x
# 128, 8 warps). On an H100 (python -m bench.ops.sweep_quantize_heads ->
# bench/results/ops/h100-2026-12-05-quantize-heads-tiles.txt): FLUX.1 33.6 us, Wan2.1-1.3B 97.1, Wan2.1-14B 296.0,
# where the QK-norm kernel's 2048-element tile took 35.6 / 101.8 / 339.9; the same bytes.
HEADS_CONFIG = KernelConfig(tile=8192, per_thread=32)


def _launch_heads(x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """The two passes (amax, cast) over x, or over x then y along the sequence."""
    if out.numel() == 0:
        out_scale.fill_(SCALE_FLOOR / FP8_MAX)
        return
    batch, seq, heads, head_dim = out.shape
    plan = tile_plan(seq, heads, head_dim, False, HEADS_CONFIG)  # tiles as the QK-norm kernel's: no padded heads
    y_ = x if y is None else y
    out_scale.zero_()
    for cast in (False, True):
        quantize_heads_kernel[(cdiv(seq, plan.block_t), plan.head_blocks, batch)](
            x, y_, out, out_scale, seq, x.shape[1], heads, x.stride(0), x.stride(1), x.stride(2),
            y_.stride(0), y_.stride(1), y_.stride(2),
            D=head_dim, CAST=cast, CAT=y is not None, BLOCK_T=plan.block_t, BLOCK_H=plan.block_h,
            BLOCK_D=plan.block_d, num_warps=plan.num_warps,
        )


@register_op("quantize_heads", mutates_args=("out", "out_scale"), fake=_check_quantize_heads,
             fallback=_quantize_heads_into_ref)
def _quantize_heads_launch(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_quantize_heads(x, out, out_scale)
    _launch_heads(x, None, out, out_scale)


# quantize_heads_cat: quantize_heads of cat([a, b], 1), reading a and b where they are (a joint attention's
# text and image values: FLUX.1's double-stream blocks, Qwen-Image), so the concatenation is never written


def _check_quantize_heads_cat(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_heads("a", a)
    _check_heads("b", b)
    expect_dtype("b", b, a.dtype)
    batch, seq_a, heads, head_dim = a.shape
    if b.shape[0] != batch or b.shape[2:] != a.shape[2:]:
        raise InvalidArgumentError("b", f"expected shape ({batch}, seq, {heads}, {head_dim}) (a's batch, heads and "
                                        f"head_dim), got {tuple(b.shape)}")
    _check_outputs((batch, seq_a + b.shape[1], heads, head_dim), out, out_scale)
    expect_same_device({"a": a, "b": b, "out": out, "out_scale": out_scale})


def _quantize_heads_cat_into_ref(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _quantize_heads_into_ref(torch.cat([a, b], 1), out, out_scale)


@register_op("quantize_heads_cat", mutates_args=("out", "out_scale"), fake=_check_quantize_heads_cat,
             fallback=_quantize_heads_cat_into_ref)
def _quantize_heads_cat_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    _check_quantize_heads_cat(a, b, out, out_scale)
    if a.shape[1] == 0 or b.shape[1] == 0:  # one side empty (its pointer may be null): the other alone
        _launch_heads(b if a.shape[1] == 0 else a, None, out, out_scale)
    else:
        _launch_heads(a, b, out, out_scale)


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.quantize_heads`` into new buffers: x (B, S, H, D) -> (fp8 (B, S, H, D), float32 (B, H))."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    out_scale = torch.empty(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
    torch.ops.diffc.quantize_heads(x, out, out_scale)
    return out, out_scale


# ---------------------------------------------------------------------------------------------
# attention_flashinfer_fp8: fp8 q, k, v (B, H, S, D) + per-head scales -> bf16 (B, H, S_q, D)
# ---------------------------------------------------------------------------------------------


def _item(scale: torch.Tensor, b: int) -> torch.Tensor:
    """Batch item b's (H,) scales: a (H,) scale itself, row b of a (B, H) one."""
    return scale if scale.ndim == 1 else scale[b]


def _per_item(scale: torch.Tensor) -> torch.Tensor:
    """A (H,) or (B, H) scale as (B or 1, H, 1, 1), to multiply a (B, H, S, D) tensor."""
    return scale.reshape(-1, scale.shape[-1], 1, 1)


def attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """What the fp8 kernel approximates: dequantize (``x8.float() * scale`` per head), SDPA in float32, bf16.

    q: (B, H, S_q, D), k/v: (B, H, S_kv, D) float8_e4m3fn; scales (H,) or (B, H) float32 -> (B, H, S_q, D).
    """
    qf, kf, vf = (x.float() * _per_item(s) for x, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    return F.scaled_dot_product_attention(qf, kf, vf, scale=scale).to(OUT_DTYPE)


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                     k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    if q.ndim != 4:
        raise InvalidArgumentError("q", f"expected shape (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    batch, heads, seq_q, head_dim = q.shape
    expect_shape("k", k, (batch, heads, k.shape[2] if k.ndim == 4 else -1, head_dim),
                 f"({batch}, {heads}, seq_kv, {head_dim})")
    expect_shape("v", v, tuple(k.shape), f"k's shape {tuple(k.shape)}")
    for field, t in (("q", q), ("k", k), ("v", v)):
        expect_dtype(field, t, FP8)
        expect_unit_last_stride(field, t)
    for field, t in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(t.shape) not in ((heads,), (batch, heads)):
            raise InvalidArgumentError(field, f"expected shape ({heads},) or ({batch}, {heads}): one scale per head "
                                              f"(for every batch item, or per batch item), got {tuple(t.shape)}")
        expect_dtype(field, t, torch.float32)
        if not t.is_contiguous():
            raise InvalidArgumentError(field, "must be contiguous")
    expect_same_device({"q": q, "k": k, "v": v, "q_scale": q_scale, "k_scale": k_scale, "v_scale": v_scale})
    return q.new_empty(batch, seq_q, heads, head_dim, dtype=OUT_DTYPE).transpose(1, 2)


def _attention_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                        k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    _check_attention(q, k, v, q_scale, k_scale, v_scale, scale)
    return bshd_output(q, attention_fp8_ref(q, k, v, q_scale, k_scale, v_scale, scale))


def fp8_kernel_unavailable(device: torch.device) -> str | None:
    """Why flashinfer's fp8 FA3 kernel cannot run on ``device`` (it needs a Hopper (sm_90) GPU with flashinfer
    importable), or None."""
    if device.type != "cuda":
        return f"needs a Hopper GPU, not {device.type}"
    why = flashinfer_unavailable()
    if why is not None:
        return why
    major, minor = torch.cuda.get_device_capability(device)
    return None if major == 9 else f"flashinfer's FA3 fp8 kernel runs on Hopper (sm90), not sm{major}{minor}"


@register_op("attention_flashinfer_fp8", mutates_args=(), fake=_check_attention, fallback=_attention_fallback,
             unavailable=fp8_kernel_unavailable)
def attention_flashinfer_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                             k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    import flashinfer

    _check_attention(q, k, v, q_scale, k_scale, v_scale, scale)
    outs = [
        flashinfer.single_prefill_with_kv_cache(  # (S_q, H, D) views of the (B, S, H, D) buffers
            q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1),
            scale_q=_item(q_scale, b), scale_k=_item(k_scale, b), scale_v=_item(v_scale, b), o_dtype=OUT_DTYPE,
            causal=False, kv_layout="NHD", sm_scale=scale, backend="fa3")
        for b in range(q.shape[0])
    ]
    out = outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)  # (B, S_q, H, D)
    return out.transpose(1, 2)
