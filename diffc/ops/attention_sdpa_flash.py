"""torch's own FlashAttention-2 kernel (SDPA's flash backend) as ``torch.ops.diffc.attention_sdpa_flash``.

The compile-time attention selection picks it where it measures fastest (:data:`BACKENDS` ``"sdpa_flash"``).
The ATen op behind it, ``aten._scaled_dot_product_flash_attention``, returns a uint64 RNG state beside the
output, and torch.export's serializer before torch 2.13 has no uint64 (``SerializeError``): a program holding
that op could not be written as an artifact. This op calls the same kernel and returns the output alone,
(batch, heads, seq, head_dim) as a view of a (batch, seq, heads, head_dim) tensor, which is what the kernel
returns and what :mod:`.attention_fa4`'s fake describes. Off a GPU it runs its SDPA reference.
"""

from __future__ import annotations

import torch

from .attention_fa4 import _check, _fallback, bshd_output
from .registry import register_op


def _unavailable(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA GPU, not {device.type}"


@register_op("attention_sdpa_flash", mutates_args=(), fake=_check, fallback=_fallback, unavailable=_unavailable)
def attention_sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    # (q, k, v, dropout_p, is_causal, return_debug_mask, *, scale) -> (output, logsumexp, ..., rng_state, ...)
    out = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, False, False, scale=scale)[0]
    return out if out.transpose(1, 2).is_contiguous() else bshd_output(q, out)
