"""Bias add + tanh GELU (the FFN's first-linear epilogue): ``python -m bench.ops.bench_gelu_tanh``.

FLUX.1: hidden 12,288 over 4096 image tokens (ff) and 4608 joint tokens (single-stream proj_mlp).
Wan2.1 1.3B / 14B: ffn 8960 / 13,824 over 32,760 tokens.
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, randn, run
from diffc.ops.gelu_tanh import gelu_tanh_ref

# name: (tokens, hidden)
SIZES = {
    "flux ff 4096tok h12288": (4096, 12288),
    "flux single 4608tok h12288": (4608, 12288),
    "wan-1.3b ffn 32760tok h8960": (32760, 8960),
    "wan-14b ffn 32760tok h13824": (32760, 13824),
}


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (tokens, hidden) in SIZES.items():
        x = randn(1, tokens, hidden, dtype=dtype, device=device, seed=1)
        bias = randn(hidden, dtype=dtype, device=device, seed=2)
        outs = (torch.empty_like(x),)

        def fused(x=x, bias=bias, outs=outs):
            torch.ops.diffc.gelu_tanh(x, bias, *outs)

        out.append(Case(name, gelu_tanh_ref, (x, bias), fused, outs, nbytes(x, bias, *outs)))
    return out


if __name__ == "__main__":
    run("diffc::gelu_tanh", cases)
