"""The Wan VAE's fused ops: ``python -m bench.ops.bench_channel_norm``.

``diffc::channel_rms_norm_silu`` (a convolution's output + its bias, RMS norm over channels, SiLU, written
with the next convolution's zero border) and ``diffc::channel_bias_residual`` (``(conv + bias) + residual``)
on channels-last maps of one decoder chunk of Wan2.1's VAE at 832x480 (four frames per chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ops import Case, nbytes, norm_weight, randn, run
from diffc.ops.channel_norm import channel_bias_residual_ref, channel_rms_norm_silu_ref

# name: (channels, frames, height, width) of one decoder chunk
SIZES = {
    "96ch 4x480x832": (96, 4, 480, 832),
    "192ch 4x240x416": (192, 4, 240, 416),
    "384ch 2x120x208": (384, 2, 120, 208),
}


def _map(c, t, h, w, dtype, device, seed):
    return randn(1, c, t, h, w, dtype=dtype, device=device, seed=seed).contiguous(memory_format=torch.channels_last_3d)


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (c, t, h, w) in SIZES.items():
        x = _map(c, t, h, w, dtype, device, 1)
        gamma, bias = norm_weight(c, dtype=dtype, device=device, seed=2), randn(c, dtype=dtype, device=device, seed=3)
        padded = (torch.empty(1, c, t, h + 2, w + 2, dtype=dtype, device=device,
                              memory_format=torch.channels_last_3d),)

        def norm_ref(x, gamma, bias, c=c):
            return F.pad(channel_rms_norm_silu_ref(x, gamma, c**0.5, 1e-12, bias), (1, 1, 1, 1))

        def norm_fused(x=x, gamma=gamma, bias=bias, outs=padded, c=c):
            torch.ops.diffc.channel_rms_norm_silu(x, gamma, bias, c**0.5, 1e-12, 1, 1, *outs)

        out.append(Case(f"norm+silu {name}", norm_ref, (x, gamma, bias), norm_fused, padded, nbytes(x, *padded)))
        residual = _map(c, t, h, w, dtype, device, 4)
        summed = (torch.empty_like(x),)

        def add_fused(x=x, bias=bias, residual=residual, outs=summed):
            torch.ops.diffc.channel_bias_residual(x, bias, residual, *outs)

        out.append(Case(f"bias+residual {name}", channel_bias_residual_ref, (x, bias, residual), add_fused, summed,
                        nbytes(x, residual, *summed)))
    return out


if __name__ == "__main__":
    run("diffc::channel_rms_norm_silu / channel_bias_residual", cases)
