"""Attention whose boolean mask only drops keys (prompt padding): ``diffc::attention_key_padding``.

Joint-attention DiTs that pad the prompt to a fixed length pass SDPA a ``(B, 1, 1, S_kv)`` boolean mask
that drops the padding's keys: after the image tokens in diffusers' HunyuanVideo, between the text and
the image in Qwen-Image. With any mask, torch's fused kernels fall back to a masked variant: on an H200
at HunyuanVideo's shape (24 heads x 128, 32,896 tokens, 180 valid text tokens) cuDNN's masked kernel
takes 31.4 ms where the unmasked one over the kept keys takes 22.9 ms
(``bench/results/h200-2026-12-04-hunyuanvideo-attention.json``). The compile pass lowers onto it only long
sequences (:mod:`diffc.compile.passes.key_padding`), where that gain outweighs the costs below.

This op computes the same attention as ``scaled_dot_product_attention(q, k, v, attn_mask=mask)`` by
running unmasked attention over each batch element's kept keys: a slice of k and v when they are a
prefix (no copy), else the kept rows gathered (a copy of k and v, small beside the attention). Reading
the mask costs a device-to-host copy per call (two when keys must be gathered), so a DiT whose compiled
graphs call the op runs without CUDA graphs (the stack says so; at the sequence lengths where this op
pays, a forward takes seconds and launch overhead is well under 1%). A batch
element whose mask keeps no key runs the masked attention itself (whose output torch defines). The
output is a (B, H, S_q, D) view of a (B, S_q, H, D) tensor, the layout the DiT's next transpose makes
contiguous, as the other attention ops return it.

``diffc::attention_fa4_key_mask`` is the same attention without a host read, for CUDA graphs: on the device,
each batch element's kept keys (and values) are copied to the front in order (a stable sort of the mask, a
gather of k and v) and FlashAttention-4 runs over that many of them (its ``seqused_k``, a device tensor).
The copy costs about one read and one write of k and v, small beside the attention at the sequence lengths
where the masked kernel is slow (Qwen-Image's 4,224 tokens, a prompt padded to its length bucket). A batch
element whose mask keeps no key gets zeros, as torch's masked SDPA returns them. The compile-time attention
selection (:mod:`diffc.compile.attention_select`) measures it against the masked SDPA per shape and lowers
onto it where it is faster; without flash-attn-4 or a Hopper/Blackwell GPU it runs the masked SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .attention_fa4 import bshd_output, fa4_unavailable_on
from .registry import expect_same_device, expect_shape, register_op


def key_padding_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """The masked attention the op replaces: ``softmax(q k^T * scale, masked) v``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def key_mask_ok(mask_shape, q_shape, k_shape) -> bool:
    """Whether a mask of ``mask_shape`` only selects keys: ``(B or 1, 1, 1, S_kv)`` for q ``(B, H, S_q, D)``."""
    return (len(mask_shape) == 4 and tuple(mask_shape[1:3]) == (1, 1) and mask_shape[0] in (1, q_shape[0])
            and mask_shape[3] == k_shape[2])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
    b, h, s_q, d = q.shape
    expect_shape("k", k, (b, h, k.shape[2], d), f"({b}, {h}, seq_kv, {d})")
    expect_shape("v", v, (b, h, k.shape[2], v.shape[3]), f"({b}, {h}, {k.shape[2]}, head_dim_v)")
    if mask.dtype != torch.bool or not key_mask_ok(tuple(mask.shape), tuple(q.shape), tuple(k.shape)):
        raise InvalidArgumentError("mask", f"expected a boolean key mask of shape ({b} or 1, 1, 1, {k.shape[2]}), "
                                           f"got {mask.dtype} {tuple(mask.shape)}")
    expect_same_device({"q": q, "k": k, "v": v, "mask": mask})
    return q.new_empty(b, s_q, h, v.shape[3]).transpose(1, 2)


def _fallback(q, k, v, mask, scale=None) -> torch.Tensor:
    return bshd_output(q, key_padding_ref(q, k, v, mask, scale))


def kept_keys(mask: torch.Tensor, batch: int) -> list[slice | torch.Tensor] | None:
    """Per batch element, the keys its mask keeps: a slice when they are a prefix, else their indices; None
    when an element keeps no key."""
    rows = mask.reshape(mask.shape[0], mask.shape[-1]).expand(batch, mask.shape[-1])
    counts = rows.sum(-1)
    prefix = rows == (torch.arange(rows.shape[1], device=rows.device) < counts[:, None])
    values = torch.cat([counts, prefix.all(-1).to(counts.dtype)]).tolist()
    counts, prefixes = values[:batch], values[batch:]
    if min(counts) == 0:
        return None
    return [slice(0, n) if is_prefix else rows[i].nonzero().squeeze(1)
            for i, (n, is_prefix) in enumerate(zip(counts, prefixes))]


def _kept(t: torch.Tensor, keys: slice | torch.Tensor) -> torch.Tensor:
    return t[:, :, keys] if isinstance(keys, slice) else t.index_select(2, keys)


@register_op("attention_key_padding", mutates_args=(), fake=_check, fallback=_fallback, runs=lambda device: True,
             reads_host=True)
def attention_key_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    _check(q, k, v, mask, scale)
    batch = q.shape[0]
    keys = kept_keys(mask, batch)
    if keys is None:
        return _fallback(q, k, v, mask, scale)
    if all(isinstance(s, slice) for s in keys) and len({s.stop for s in keys}) == 1:  # one prefix for the batch
        return bshd_output(q, F.scaled_dot_product_attention(q, _kept(k, keys[0]), _kept(v, keys[0]), scale=scale))
    out = q.new_empty(batch, q.shape[2], q.shape[1], v.shape[3])
    for i, kept in enumerate(keys):
        b = slice(i, i + 1)
        out[i] = F.scaled_dot_product_attention(q[b], _kept(k[b], kept), _kept(v[b], kept), scale=scale)[0].transpose(0, 1)
    return out.transpose(1, 2)


def compact_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (B, H, S_kv, D) and a key mask (B or 1, 1, 1, S_kv) -> (B, S_kv, H, D) contiguous copies of k and v
    with each batch element's kept keys first, in their order, and the int32 (B,) count of kept keys.

    Everything stays on the device (no host read, so a CUDA graph can hold it); the rows after an element's
    count are its dropped keys, which the kernel does not read."""
    batch, seq = k.shape[0], k.shape[2]
    keep = mask.reshape(mask.shape[0], seq).expand(batch, seq)
    order = torch.argsort(torch.logical_not(keep).to(torch.uint8), dim=1, stable=True)  # kept first, in order
    rows = (order + torch.arange(batch, device=k.device)[:, None] * seq).reshape(-1)  # into (B * S_kv) token rows

    def gather(x: torch.Tensor) -> torch.Tensor:  # whole (heads, head_dim) token rows: one index_select
        b, h, s, d = x.shape
        return x.transpose(1, 2).reshape(b * s, h, d).index_select(0, rows).view(b, s, h, d)

    return gather(k), gather(v), keep.sum(1, dtype=torch.int32)


def _checked_fallback(q, k, v, mask, scale=None) -> torch.Tensor:
    _check(q, k, v, mask, scale)
    return _fallback(q, k, v, mask, scale)


@register_op("attention_fa4_key_mask", mutates_args=(), fake=_check, fallback=_checked_fallback,
             unavailable=fa4_unavailable_on)
def attention_fa4_key_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    from flash_attn.cute import flash_attn_varlen_func

    _check(q, k, v, mask, scale)
    kc, vc, used = compact_keys(k, v, mask)
    out = flash_attn_varlen_func(q.transpose(1, 2), kc, vc, seqused_k=used, softmax_scale=scale, causal=False)
    out = out[0] if isinstance(out, tuple) else out  # (B, S_q, H, D)
    return out.transpose(1, 2)
