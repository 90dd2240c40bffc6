"""Sinusoidal timestep projection: ``python -m bench.ops.bench_timestep_embedding``.

FLUX.1 and Wan2.1: 256 channels for a batch of 1-2 timesteps (launch-latency bound: the unfused
sequence is ~8 kernels), and Wan2.2-style per-token timesteps: 32,760 rows.
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, run
from diffc.ops.timestep_embedding import MODEL_SETTINGS, timestep_embedding_ref

# name: (timesteps, dim, model)
SIZES = {
    "flux batch 1 d256": (1, 256, "flux"),
    "flux cfg batch 2 d256": (2, 256, "flux"),
    "wan per-token 32760 d256": (32760, 256, "wan"),
}


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (n, dim, model) in SIZES.items():
        settings = MODEL_SETTINGS[model]
        t = (torch.rand(n, generator=torch.Generator(device=device).manual_seed(0), device=device) * 1000).to(dtype)
        emb = torch.empty(n, dim, device=device)  # float32, as both models produce it

        def fused(t=t, emb=emb, s=settings):
            torch.ops.diffc.timestep_embedding(
                t, s["flip_sin_to_cos"], s["downscale_freq_shift"], s["scale"], s["max_period"], emb
            )

        def ref(t, dim=dim, s=settings):
            return timestep_embedding_ref(t, dim, **s)

        out.append(Case(name, ref, (t,), fused, (emb,), nbytes(t, emb)))
    return out


if __name__ == "__main__":
    run("diffc::timestep_embedding", cases)
