"""Where LoRA merges read and write: the interface the runtime's weight-transform layer hosts.

A merge only ever writes into the tensors :meth:`ModuleWeights.tensors` returns, in place
(``copy_``), so every compiled graph, packed weight view and CUDA graph that reads those tensors
sees the new values at the same addresses. The default is the eager DiT's parameters under any
compiled or CUDA-graph wrapper. A placement layer whose real weights live elsewhere (layerwise
offload's host copies) supplies its own ``tensors`` and is told through ``written`` which names
changed, e.g. to refresh device-resident copies.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

DIT_COMPONENTS = ("transformer", "transformer_2")


def eager_module(module: Any) -> nn.Module:
    """The eager module behind a pipeline's denoiser slot (the runtime executor's ``DiTStack``)."""
    from ..runtime.dit_stack import unwrap

    return unwrap(module)


class LoraTransform:
    """The LoRA entry of a ``DiTStack``'s weight transforms (what ``describe()`` and the perf dump show)."""

    def __init__(self, manager, component: str):
        self.manager, self.component = manager, component

    def describe(self) -> dict[str, Any]:
        merged = self.manager.merged.get(self.component, ())
        return {"kind": "lora", "merged": [{"nickname": n, "strength": s} for n, s in merged if n],
                **self.manager.stash.describe()}


class ModuleWeights:
    """The parameters of each DiT component's eager module, by their checkpoint names."""

    def __init__(self, components: dict[str, Any]):
        self.components = components
        self.manager = None  # set by the LoraManager using this

    def names(self) -> tuple[str, ...]:
        """The DiT components present (``transformer``, and ``transformer_2`` for Wan2.2)."""
        return tuple(n for n in DIT_COMPONENTS if self.components.get(n) is not None)

    def model(self, component: str) -> nn.Module:
        return eager_module(self.components[component])

    def tensors(self, component: str) -> dict[str, torch.Tensor]:
        """Name -> the tensor a merge updates in place."""
        return dict(self.model(component).named_parameters())

    def prepare(self, component: str, names: Iterable[str]) -> None:
        """Called before a merge or unmerge writes ``names`` of ``component``: a weight transform that keeps
        originals off the device (the fp8 tier's host copies) brings those back to be written in place."""
        for t in getattr(self.components.get(component), "transforms", ()):
            if hasattr(t, "weights_needed"):
                t.weights_needed(tuple(names))

    def written(self, component: str, names: Iterable[str]) -> None:
        """Called after a merge or unmerge changed ``names`` of ``component``: the first time, the LoRA
        joins the executor stack's weight transforms (a no-op for a plain module)."""
        stack = self.components.get(component)
        if self.manager is None or not hasattr(stack, "add_transform"):
            return
        names = tuple(names)
        for t in stack.transforms:  # e.g. the fp8 tier's weight copies, re-quantized from the merged weights
            if hasattr(t, "weights_written"):
                t.weights_written(names)
        ours = [t for t in stack.transforms if isinstance(t, LoraTransform)]
        if not any(t.manager is self.manager for t in ours):
            for t in ours:  # a previous manager of this pipeline
                stack.remove_transform(t)
            stack.add_transform(LoraTransform(self.manager, component))
