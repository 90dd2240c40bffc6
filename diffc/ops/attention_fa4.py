"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL) as ``torch.ops.diffc.attention_fa4``.

The compile-time attention selection (:mod:`diffc.compile.attention_select`) measures it beside torch's
SDPA kernels and lowers a graph's ``scaled_dot_product_attention`` onto it where it is fastest. Layout:
q, k, v and the output are (batch, heads, seq, head_dim) as SDPA's, but FA4 works in (batch, seq,
heads, head_dim): DiTs produce q/k/v that way and transpose for SDPA, so the transposes here are views,
and the output is returned as a (batch, heads, seq, head_dim) view of FA4's (batch, seq, heads,
head_dim) tensor, which the DiT's following transpose turns back into a contiguous one.

FA4 compiles a kernel per shape at first use (about 2 s); its persistent cache is switched on and kept
under diffc's cache folder (``$DIFFC_CACHE/kernels/fa4``), so ``diffc compile`` pays the compilation and
later runs on the same machine load the cached kernels. Without the package, or off a Hopper/Blackwell
GPU, the op runs its reference (torch's SDPA).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..fileio import cache_dir
from .registry import expect_shape, register_op


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, as torch's SDPA computes it; q: (B, H, S_q, D), k/v: (B, H, S_kv, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def bshd_output(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (B, H, S, D) in the layout the external kernels return: a view of a (B, S, H, D) tensor."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@functools.cache
def fa4_unavailable() -> str | None:
    """Why FlashAttention-4 cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, _ = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"needs a Hopper or Blackwell GPU (sm_90/sm_100), this one is sm_{major}x"
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache_dir() / "kernels" / "fa4"))
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install fails with more than ImportError)
        return f"flash-attn-4 cannot be imported ({type(e).__name__}: {e}); pip install diffc[fa4]"
    return None


def fa4_unavailable_on(device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot run on ``device``, or None (the ops around its kernels run there)."""
    return fa4_unavailable() if device.type == "cuda" else f"needs a CUDA GPU, not {device.type}"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    b, h, _, d = q.shape
    expect_shape("k", k, (b, h, k.shape[2], d), f"({b}, {h}, seq_kv, {d})")
    expect_shape("v", v, tuple(k.shape))
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


def _fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return bshd_output(q, attention_ref(q, k, v, scale))


@register_op("attention_fa4", mutates_args=(), fake=_check, fallback=_fallback, unavailable=fa4_unavailable_on)
def attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    # (B, H, S, D) views of DiTs' (B, S, H, D) tensors: transposing back is free
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=False)
    out = out[0] if isinstance(out, tuple) else out  # (B, S_q, H, D)
    return out.transpose(1, 2)
