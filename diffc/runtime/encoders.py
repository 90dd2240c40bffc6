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

With a compiled pipeline on a GPU (every tier but lossless), the encoders' SDPA calls get their float masks with a
unit last stride (:class:`ContiguousMasks`). transformers 5.17 hands T5's and UMT5's relative-position bias (FLUX.1,
SD3, Wan) to SDPA as a permuted view, which no fused kernel reads: torch ran those calls on its math path (q, k, v
upcast to float32, the scores materialised), ~12 of the 25.5 ms of a T5-XXL encode of 512 tokens replayed from a
graph on an H100; with the mask copied, cuDNN's attention runs them (0.044 ms a layer against 0.48).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .cudagraphs import DEFAULT_MAX_GRAPHS, CudaGraphModule, graphs_off_reason


def strided_mask(args: tuple, kwargs: dict, copy=None) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of an SDPA call with its float mask made contiguous (by ``copy(mask)``, default
    ``Tensor.contiguous``), where the mask's last dimension is strided (T5's position bias as transformers 5.17
    builds it: a permuted (1, heads, q, k) view), else None. SDPA's fused kernels (cuDNN's, the memory-efficient
    one) read masks with a unit last stride only, so torch runs such a call on its math path."""
    if len(args) > 3:
        mask, where = args[3], 3
    elif "attn_mask" in kwargs:
        mask, where = kwargs["attn_mask"], "attn_mask"
    else:
        return None
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.dim() == 0 or \
            mask.shape[-1] < 2 or mask.stride(-1) == 1:
        return None
    dense = mask.contiguous() if copy is None else copy(mask)
    if where == 3:
        return (*args[:3], dense, *args[4:]), kwargs
    return args, {**kwargs, "attn_mask": dense}


class ContiguousMasks(TorchFunctionMode):
    """While active: each ``F.scaled_dot_product_attention`` call with a strided float mask gets the mask as a
    contiguous copy (:func:`strided_mask`: the same values), so SDPA can choose a fused kernel; every other call
    runs as it is. The same mask tensor read again (T5 hands its first layer's position bias object to all 24
    layers) reuses the last copy while its memory, layout and version counter are unchanged (an inference tensor,
    as the pipelines' encodes make, has no version counter: an in-place write to it between two attention calls
    of one forward would go unseen; T5 and UMT5 write none). The permuted copy of T5-XXL's bias is ~0.25 ms a layer
    on an H100."""

    def __init__(self):
        super().__init__()
        self._last: tuple | None = None  # (source, key, copy)

    @staticmethod
    def _key(mask: torch.Tensor) -> tuple:
        version = None if mask.is_inference() else mask._version
        return mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device, version

    def _copy(self, mask: torch.Tensor) -> torch.Tensor:
        key = self._key(mask)
        if self._last is None or self._last[0] is not mask or self._last[1] != key:
            self._last = (mask, key, mask.contiguous())
        return self._last[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = strided_mask(tuple(args), kwargs, self._copy)
            if call is not None:
                args, kwargs = call
        return func(*args, **kwargs)


class _MaskHooks:
    """Forward hooks that hold a :class:`ContiguousMasks` mode over a module's forward."""

    def __init__(self, module: nn.Module):
        self.modes: list[ContiguousMasks] = []
        self.handles = [module.register_forward_pre_hook(self._enter),
                        module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, *_):
        mode = ContiguousMasks()
        mode.__enter__()
        self.modes.append(mode)

    def _exit(self, *_):
        if self.modes:
            self.modes.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class EncoderGraphs:
    """The encoder components named in ``names``: graphed (in ``components``, in place) or eager, as the
    device, the ``cuda_graphs`` option (None: on for CUDA) and the placement allow."""

    def __init__(self, components: MutableMapping[str, Any], names: Iterable[str], device: torch.device,
                 cuda_graphs: bool | None = None, *, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.components, self.device, self.max_graphs = components, torch.device(device), max_graphs
        self.modules = {n: components[n] for n in names if isinstance(components.get(n), nn.Module)}
        self.requested, self.blocked, self.reason = cuda_graphs, None, None
        self._fused: dict[str, _MaskHooks] = {}
        self._apply()

    @property
    def fused_attention(self) -> bool:
        """Whether the encoders run under :class:`ContiguousMasks` (their masked attention on SDPA's fused kernels)."""
        return bool(self._fused)

    def set_fused_attention(self, enabled: bool) -> None:
        """Run (or stop running) each encoder's forward under :class:`ContiguousMasks`; captured graphs, which
        hold the other kernels, are dropped."""
        if bool(enabled) == self.fused_attention:
            return
        for hooks in self._fused.values():
            hooks.remove()
        self._fused = {n: _MaskHooks(m) for n, m in self.modules.items()} if enabled else {}
        for name in self.modules:
            current = self.components.get(name)
            if isinstance(current, CudaGraphModule):
                current.reset()

    def set_cuda_graphs(self, enabled: bool | None) -> None:
        self.requested = enabled
        self._apply()

    def set_blocked(self, reason: str | None) -> None:
        """Run the encoders eagerly for ``reason`` (an offload placement), or allow graphs again (None)."""
        self.blocked = reason
        self._apply()

    def describe(self) -> dict[str, Any]:
        """Per encoder: its ``CudaGraphModule.describe()``, or ``{"enabled": False, "reason": ...}``; with
        ``"fused_attention": True`` under :class:`ContiguousMasks`."""
        out = {}
        for name in self.modules:
            wrapper = self.components.get(name)
            out[name] = (wrapper.describe() if isinstance(wrapper, CudaGraphModule)
                         else {"enabled": False, "reason": self.reason})
            if name in self._fused:
                out[name]["fused_attention"] = True
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


__all__ = ["ContiguousMasks", "EncoderGraphs", "strided_mask"]
