"""Gated residual, alone and fused with the next adaptive LayerNorm: ``python -m bench.ops.bench_gated_residual``.

FLUX.1: dim 3072 over 4096 image tokens, gate/scale/shift (B, 1, C) in the activations' dtype.
Wan2.1 1.3B / 14B: dim 1536 / 5120 over 32,760 tokens, float32 gate/scale/shift (B, 1, C) strided.
The fused pair is timed against the unfused sequence (residual, then LayerNorm + modulation).
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, randn, run
from bench.ops.bench_adaln_modulate import SIZES, modulation
from diffc.ops.adaln_modulate import LAYER_NORM_EPS
from diffc.ops.gated_residual import gated_residual_adaln_ref, gated_residual_ref


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (batch, seq, dim, model) in SIZES.items():
        x, y = (randn(batch, seq, dim, dtype=dtype, device=device, seed=s) for s in (1, 2))
        gate = modulation(model, batch, dim, dtype, device, seed=3)[0]
        scale, shift = modulation(model, batch, dim, dtype, device, seed=4)
        residual, normed = torch.empty_like(x), torch.empty_like(x)

        def alone(args=(x, y, gate), outs=(residual,)):
            torch.ops.diffc.gated_residual(*args, *outs)

        out.append(Case(f"{name} residual", gated_residual_ref, (x, y, gate), alone, (residual,), nbytes(x, y, x)))
        args = (x, y, gate, scale, shift, LAYER_NORM_EPS)

        def pair(args=args, outs=(residual, normed)):
            torch.ops.diffc.gated_residual_adaln(*args, *outs)

        out.append(Case(f"{name} +adaln", gated_residual_adaln_ref, args, pair, (residual, normed), nbytes(x, y, x, x)))
    return out


if __name__ == "__main__":
    run("diffc::gated_residual / gated_residual_adaln", cases)
