"""Warm a compiled pipeline up at load, so its first generation runs at the speed of the later ones.

The first DiT call after ``diffc run --compiled`` loads every Triton kernel from the artifact's cache,
lets cuBLAS/cuDNN pick their GEMM and attention plans and captures the CUDA graph: on an H200 the first
FLUX.1-dev step took 620 ms against 124 ms for the others. :func:`warm_up_compiled` pays that at load:
for each compiled bucket (one text length of each shape) it runs the pipeline up to its first DiT call (the
text encoders warm up too), then calls each denoiser's stack once on those exact inputs (CUDA graphs capture
there), decodes zero latents of the bucket's size with the VAE's fused kernels (where it has them), and zeroes
the compiled layer's counters so the perf dump counts the user's calls only. A stack with a step cache is left
alone (its state belongs to a generation).
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from ..models.vae_blocks import uses_fused_vae
from .compiled import CompiledCounters


def warm_up_compiled(pipe, manifest: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
    """Run each compiled bucket's DiT call once (on CUDA; elsewhere only with ``force``); returns what it did."""
    from ..compile.pipeline import capture_inputs, warm_vae_kernels

    if pipe.device.type != "cuda" and not force:
        return {"skipped": f"warm-up runs on CUDA devices (here {pipe.device.type})"}
    start = time.perf_counter()
    requests, seen = [], set()
    for stage in manifest.get("stages", {}).values():
        for bucket in stage.get("buckets", []):
            request = bucket.get("request")
            # one text length per shape (of an artifact compiled for every prompt length): the kernels load and
            # the GEMMs plan once; other lengths capture their CUDA graph at their first call
            key = json.dumps({k: v for k, v in request.items() if k != "prompt_length"} if isinstance(request, dict)
                             else request, sort_keys=True, default=str)
            if isinstance(request, dict) and key not in seen:
                seen.add(key)
                requests.append(request)
    calls = decodes = 0
    stacks = pipe.executor.stacks
    fused_vae = uses_fused_vae(pipe.components.get("vae"))
    for request in requests:
        inputs = capture_inputs(pipe, request)
        with torch.inference_mode():
            for name, stack in stacks.items():
                if stack.cache is None and name in inputs:
                    stack(**inputs[name])
                    calls += 1
        if fused_vae:
            decodes += warm_vae_kernels(pipe, request, inputs, force=force)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    for stack in stacks.values():
        if stack.compiled is not None:
            stack.compiled.counters = CompiledCounters()
    return {"buckets": len(requests), "dit_calls": calls, "vae_decodes": decodes, "seconds": time.perf_counter() - start}


__all__ = ["warm_up_compiled"]
