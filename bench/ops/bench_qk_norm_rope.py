"""RMSNorm + RoPE on q and k at production sizes: ``python -m bench.ops.bench_qk_norm_rope``.

FLUX.1: 24 heads x 128, 512 text + 4096 image tokens, per-head norm, full-width tables.
Wan2.1 1.3B / 14B: 12 / 40 heads x 128, 32,760 tokens (832x480, 81 frames), norm across heads.

The kernel's tiling is the ``CONFIGS`` entry named by ``$DIFFC_QKROPE_CONFIG`` (the title says which);
time every variant with::

    for c in default xor small warps8 large one-chunk; do
        DIFFC_QKROPE_CONFIG=$c python -m bench.ops.bench_qk_norm_rope; done
"""

from __future__ import annotations

import os

import torch

from bench.ops import Case, nbytes, norm_weight, randn, run
from diffc.models.flux.blocks import rope_tables
from diffc.models.wan.blocks import rope_frequencies
from diffc.ops.qk_norm_rope import (
    CONFIG_ENV,
    RMS_NORM_EPS,
    kernel_config,
    qk_norm_rope_across_heads_ref,
    qk_norm_rope_per_head_ref,
)

# name: (batch, seq, heads, head_dim)
FLUX = {"flux per-head 4608tok 24x128": (1, 4608, 24, 128)}
# name: (batch, latent grid, heads, head_dim)
WAN = {
    "wan-1.3b across 32760tok 12x128": (1, (21, 30, 52), 12, 128),
    "wan-14b across 32760tok 40x128": (1, (21, 30, 52), 40, 128),
}


def flux_tables(seq: int, device):
    pos = torch.arange(seq, device=device)
    ids = torch.stack([torch.zeros_like(pos), pos // 64, pos % 64], dim=1).float()
    return rope_tables(ids, (16, 56, 56))  # (seq, 128) fp32 each


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (batch, seq, heads, head_dim) in FLUX.items():
        q, k = (randn(batch, seq, heads, head_dim, dtype=dtype, device=device, seed=s) for s in (1, 2))
        wq, wk = (norm_weight(head_dim, dtype, device, seed=s) for s in (3, 4))
        args = (q, k, wq, wk, *flux_tables(seq, device), RMS_NORM_EPS)
        outs = tuple(q.new_empty(batch, heads, seq, head_dim) for _ in range(2))

        def fused(args=args, outs=outs):
            torch.ops.diffc.qk_norm_rope_per_head(*args, 0, *outs)

        out.append(Case(name, qk_norm_rope_per_head_ref, args, fused, outs, nbytes(q, k, *args[4:6], *outs)))
    for name, (batch, grid, heads, head_dim) in WAN.items():
        seq = grid[0] * grid[1] * grid[2]
        q, k = (randn(batch, seq, heads, head_dim, dtype=dtype, device=device, seed=s) for s in (1, 2))
        wq, wk = (norm_weight(heads * head_dim, dtype, device, seed=s) for s in (3, 4))
        cos, sin = rope_frequencies(head_dim, grid, torch.device(device))
        args = (q, k, wq, wk, cos, sin, RMS_NORM_EPS)
        outs = (torch.empty_like(q), torch.empty_like(k))

        def fused(args=args, outs=outs):
            torch.ops.diffc.qk_norm_rope_across_heads(*args, *outs)

        out.append(Case(name, qk_norm_rope_across_heads_ref, args, fused, outs, nbytes(q, k, cos, sin, *outs)))
    return out


if __name__ == "__main__":
    kernel_config()  # an unknown $DIFFC_QKROPE_CONFIG fails here, naming the accepted ones
    config = os.environ.get(CONFIG_ENV) or "default"
    run(f"diffc::qk_norm_rope_per_head / qk_norm_rope_across_heads (config {config})", cases)
