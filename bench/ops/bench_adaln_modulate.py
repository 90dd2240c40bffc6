"""LayerNorm + modulation at production sizes: ``python -m bench.ops.bench_adaln_modulate``.

FLUX.1: dim 3072 over 4096 image / 4608 joint tokens, scale/shift (B, 1, C) in the activations' dtype.
Wan2.1 1.3B / 14B: dim 1536 / 5120 over 32,760 tokens, float32 scale/shift strided out of (B, 1, 6, C).
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, randn, run
from diffc.ops.adaln_modulate import LAYER_NORM_EPS, adaln_modulate_ref

# name: (batch, seq, dim, model)
SIZES = {
    "flux img 4096tok c3072": (1, 4096, 3072, "flux"),
    "flux joint 4608tok c3072": (1, 4608, 3072, "flux"),
    "wan-1.3b 32760tok c1536": (1, 32760, 1536, "wan"),
    "wan-14b 32760tok c5120": (1, 32760, 5120, "wan"),
}


def modulation(model: str, batch: int, dim: int, dtype: torch.dtype, device, seed: int = 2):
    """(scale, shift): FLUX's (B, 1, C) chunks in dtype; Wan's fp32 unbind of (B, 1, 6, C)."""
    if model == "flux":
        scale, shift = randn(batch, 2 * dim, dtype=dtype, device=device, seed=seed).chunk(2, dim=1)
        return scale[:, None], shift[:, None]
    shift, scale = randn(batch, 1, 6, dim, dtype=torch.float32, device=device, seed=seed).unbind(2)[:2]
    return scale, shift


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (batch, seq, dim, model) in SIZES.items():
        x = randn(batch, seq, dim, dtype=dtype, device=device, seed=1)
        args = (x, *modulation(model, batch, dim, dtype, device), LAYER_NORM_EPS)
        outs = (torch.empty_like(x),)

        def fused(args=args, outs=outs):
            torch.ops.diffc.adaln_modulate(*args, *outs)

        out.append(Case(name, adaln_modulate_ref, args, fused, outs, nbytes(x, *outs)))
    return out


if __name__ == "__main__":
    run("diffc::adaln_modulate", cases)
