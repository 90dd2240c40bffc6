"""Applying runtime options (offload, CUDA graphs) to a loaded pipeline's components."""

from __future__ import annotations

from typing import Any

import torch

from .cudagraphs import describe_cuda_graphs, wrap_cuda_graphs
from .options import RuntimeOptions


def apply_runtime(components: dict[str, Any], device: torch.device, options: RuntimeOptions,
                  text_encoders: tuple[str, ...] = ()) -> dict[str, Any]:
    """Set up offload first (it places weights), then wrap the DiT in CUDA graphs over those weights.

    Returns the handles whose ``describe()`` goes into every generation's perf dump.
    """
    handles: dict[str, Any] = {}
    if options.offload != "none":
        from .offload import apply_offload

        handles["offload"] = apply_offload(components, device, options.offload, prefetch=options.offload_prefetch,
                                           resident_blocks=options.resident_blocks, text_encoders=text_encoders)
    graphs = options.cuda_graphs
    if graphs is None and options.offload != "none":
        # layerwise: the copies cannot be captured; model: the DiT lands at a new address every generation
        graphs = False
    wrap_cuda_graphs(components, device, graphs)
    return handles


def describe_runtime(components: dict[str, Any], handles: dict[str, Any]) -> dict[str, Any]:
    out = {name: handle.describe() for name, handle in handles.items()}
    out["cuda_graphs"] = describe_cuda_graphs(components.get("transformer"))
    from ..compile.compiled import find_compiled

    compiled = find_compiled(components)
    out["compiled"] = compiled.describe() if compiled is not None else None
    return out
