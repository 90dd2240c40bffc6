"""The 2-D VAE's fused group norm: ``python -m bench.ops.bench_group_norm``.

``diffc::group_norm`` (a convolution's output + its bias, group norm over 32 groups, SiLU) on channels-last maps
at the widths and sizes of FLUX.1's VAE decoder for a 1024² image, against torch's ``F.group_norm`` + SiLU (whose
CUDA kernel reduces each (sample, group) row in one thread block).
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, norm_weight, randn, run
from diffc.ops.group_norm import group_norm_ref

GROUPS = 32
# name: (channels, height, width) of one decoder stage's maps
SIZES = {
    "512ch 128x128": (512, 128, 128),
    "512ch 256x256": (512, 256, 256),
    "256ch 512x512": (256, 512, 512),
    "128ch 1024x1024": (128, 1024, 1024),
}


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (c, h, w) in SIZES.items():
        x = randn(1, c, h, w, dtype=dtype, device=device, seed=1).contiguous(memory_format=torch.channels_last)
        weight = norm_weight(c, dtype=dtype, device=device, seed=2)
        bias, in_bias = randn(c, dtype=dtype, device=device, seed=3), randn(c, dtype=dtype, device=device, seed=4)
        outs = (torch.empty_like(x),)

        def ref(x, weight, bias, in_bias):
            return group_norm_ref(x, weight, bias, GROUPS, 1e-6, True, in_bias)

        def fused(x=x, weight=weight, bias=bias, in_bias=in_bias, outs=outs):
            torch.ops.diffc.group_norm(x, weight, bias, in_bias, GROUPS, 1e-6, True, *outs)

        out.append(Case(f"bias+norm+silu {name}", ref, (x, weight, bias, in_bias), fused, outs, nbytes(x, *outs)))
    return out


if __name__ == "__main__":
    run("diffc::group_norm", cases)
