"""SwiGLU gate ``silu(a) * b`` over ``[a | b]``: ``python -m bench.ops.bench_silu_mul``.

Sizes of a SwiGLU DiT feed-forward at FLUX-like and Wan-like token counts (neither FLUX.1 nor
Wan2.1 uses SwiGLU; Qwen-Image, Z-Image and HunyuanVideo's text path do).
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, randn, run
from diffc.ops.silu_mul import silu_mul_ref

# name: (tokens, hidden); the input is (tokens, 2 * hidden)
SIZES = {
    "4096tok h12288": (4096, 12288),
    "32760tok h8960": (32760, 8960),
}


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (tokens, hidden) in SIZES.items():
        x = randn(1, tokens, 2 * hidden, dtype=dtype, device=device, seed=1)
        outs = (x.new_empty(1, tokens, hidden),)

        def fused(x=x, outs=outs):
            torch.ops.diffc.silu_mul(x, *outs)

        out.append(Case(name, silu_mul_ref, (x,), fused, outs, nbytes(x, *outs)))
    return out


if __name__ == "__main__":
    run("diffc::silu_mul", cases)
