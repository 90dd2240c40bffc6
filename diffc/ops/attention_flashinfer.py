"""flashinfer's FA3 prefill kernel (the ``flashinfer-python`` package) as ``torch.ops.diffc.attention_flashinfer``.

Measured beside torch's SDPA kernels and FlashAttention-4 by the compile-time attention selection and
lowered onto where it is fastest. q, k, v and the output are (batch, heads, seq, head_dim) as SDPA's;
flashinfer takes one batch item at a time in (seq, heads, head_dim), which DiTs' q/k/v already are
(the transposes are views); the output is a (batch, heads, seq, head_dim) view of a (batch, seq,
heads, head_dim) tensor, as :mod:`.attention_fa4` returns.

flashinfer builds its kernels with nvcc at first use of each dtype (74-97 s on a 16-core machine);
its workspace is kept under diffc's cache folder (``$DIFFC_CACHE/kernels/flashinfer``) so ``diffc
compile`` pays the build and later runs on the same machine reuse it. Without the package the op runs
its reference (torch's SDPA).
"""

from __future__ import annotations

import functools
import os

import torch

from ..fileio import cache_dir
from .attention_fa4 import _check, _fallback
from .registry import register_op


@functools.cache
def flashinfer_unavailable() -> str | None:
    """Why flashinfer cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", str(cache_dir() / "kernels" / "flashinfer"))
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install fails with more than ImportError)
        return f"flashinfer cannot be imported ({type(e).__name__}: {e}); pip install diffc[flashinfer]"
    return None


def _unavailable(device: torch.device) -> str | None:
    return flashinfer_unavailable() if device.type == "cuda" else f"needs a CUDA GPU, not {device.type}"


@register_op("attention_flashinfer", mutates_args=(), fake=_check, fallback=_fallback, unavailable=_unavailable)
def attention_flashinfer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    import flashinfer

    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # (B, S_q, H, D)
    for b in range(q.shape[0]):
        out[b] = flashinfer.single_prefill_with_kv_cache(
            q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1),
            causal=False, kv_layout="NHD", sm_scale=scale, backend="fa3")
    return out.transpose(1, 2)
