"""CUDA graphs for a pipeline's text and image encoders (transformers models), one per call signature.

An encoder runs once or twice a generation, but transformers' eager forward is a long chain of small kernels
launched from Python: T5-XXL over 512 tokens is ~800 kernels (ATen calls counted) for 4.8 TFLOP of matmuls (~7 ms at an
H200's matmul rate), and FLUX.1's CLIP + T5 encode measured 43.9 ms there (``bench/results/h200-2026-12-04-flux-dev.md``),
which suggests the GPU mostly waits for the host. On a CUDA device with CUDA graphs on (the default) and the encoders
resident (offload moves their weights at every call), each encoder component is wrapped in a
:class:`~.cudagraphs.CudaGraphModule`: the first call with a new signature (batch, tokens, flags) runs eagerly
and is captured, later calls with it (the negative prompt, the next generation, a server's next request) replay
the graph. The native pipelines pad prompts to a fixed length (``max_sequence_length``, CLIP's 77), so one
request size keeps one signature; at most ``max_graphs`` signatures an encoder are captured, later ones run
eagerly. A forward that cannot be captured (a host read, e.g. a transformers release that checks the padding
mask on the host) runs eagerly for that signature, with a warning, and ``describe()`` shows why.
Qwen-Image's Qwen2.5-VL is called through its inner model at each prompt's own length and stays eager.

The replays compute what the eager forward computes: transformers builds the same attention inputs while a
capture is underway (T5/UMT5 pass their position bias as a mask either way, CLIP its causal flag), except for
a causal encoder (Qwen3) whose prompt fills every position: eagerly it skips the all-ones padding mask for
SDPA's causal flag, under capture it keeps an explicit mask (the same math through another SDPA kernel).
The graphs' memory pool keeps one encoder forward's activations (the largest signature's) reserved.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import nn

from .cudagraphs import DEFAULT_MAX_GRAPHS, CudaGraphModule, graphs_off_reason


class EncoderGraphs:
    """The encoder components named in ``names``: graphed (in ``components``, in place) or eager, as the
    device, the ``cuda_graphs`` option (None: on for CUDA) and the placement allow."""

    def __init__(self, components: MutableMapping[str, Any], names: Iterable[str], device: torch.device,
                 cuda_graphs: bool | None = None, *, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.components, self.device, self.max_graphs = components, torch.device(device), max_graphs
        self.modules = {n: components[n] for n in names if isinstance(components.get(n), nn.Module)}
        self.requested, self.blocked, self.reason = cuda_graphs, None, None
        self._apply()

    def set_cuda_graphs(self, enabled: bool | None) -> None:
        self.requested = enabled
        self._apply()

    def set_blocked(self, reason: str | None) -> None:
        """Run the encoders eagerly for ``reason`` (an offload placement), or allow graphs again (None)."""
        self.blocked = reason
        self._apply()

    def describe(self) -> dict[str, Any]:
        """Per encoder: its ``CudaGraphModule.describe()``, or ``{"enabled": False, "reason": ...}``."""
        out = {}
        for name in self.modules:
            wrapper = self.components.get(name)
            out[name] = (wrapper.describe() if isinstance(wrapper, CudaGraphModule)
                         else {"enabled": False, "reason": self.reason})
        return out

    def _apply(self) -> None:
        self.reason = graphs_off_reason(self.requested, self.device) or self.blocked  # None: graphs run
        for name, module in self.modules.items():
            current = self.components.get(name)
            if self.reason is None:
                if not isinstance(current, CudaGraphModule):
                    self.components[name] = CudaGraphModule(module, max_graphs=self.max_graphs)
            else:
                if isinstance(current, CudaGraphModule):
                    current.reset()
                self.components[name] = module


__all__ = ["EncoderGraphs"]
