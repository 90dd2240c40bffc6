"""The compiled-graph layer of a DiT stack: each block runs its region's graph for the call's shapes.

:class:`CompiledDiT` holds, per region (repeated-block list), one :class:`~diffc.compile.regions.RegionGraph`
per block call key it was compiled for. The executor asks it for each block's forward
(:meth:`CompiledDiT.block_forward`): a call whose key has a graph runs it with the block's own weights;
any other call runs the block eagerly and is counted as a fallback. Counters are per DiT forward
(``compiled_calls`` / ``eager_fallbacks``, keyed by the DiT call's shapes for the user's warning) and per
block call (``region_calls`` / ``region_fallbacks``); ``describe()`` goes into the perf dump.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..compile.regions import RegionGraph, call_key
from ..models.structure import forward_parameters

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CompiledCounters:
    compiled_calls: int = 0
    eager_fallbacks: int = 0
    fallback_keys: dict[str, int] = dataclasses.field(default_factory=dict)
    region_calls: int = 0
    region_fallbacks: int = 0


class CompiledDiT:
    """Compiled region graphs for one DiT: ``graphs[region][block call key] -> RegionGraph``.

    ``buckets`` are the DiT-level call keys the graphs were compiled for (what a user's request must
    match); ``info`` (artifact path, tier, ...) goes into ``describe()``.
    """

    def __init__(self, graphs: dict[str, dict[str, RegionGraph]], buckets: list[str], info: dict[str, Any]):
        self.graphs = graphs
        self.buckets = list(buckets)
        self.info = dict(info)
        self.counters = CompiledCounters()
        self._fell_back: bool | None = None  # during one DiT forward: did any block run eagerly
        self._outcome: dict[str, bool] = {}  # DiT key -> fell back (for forwards replayed by a CUDA graph)
        self._warned: set[str] = set()

    @functools.cached_property
    def host_reads(self) -> list[str]:
        """The regions whose graphs call an op that reads device values on the host (a CUDA graph cannot
        capture them: :data:`~diffc.ops.registry.HOST_READS`)."""
        from ..ops.registry import HOST_READS

        return sorted(region for region, per_key in self.graphs.items()
                      if any(node.op == "call_function" and node.target in HOST_READS
                             for graph in per_key.values() for node in graph.gm.graph.nodes))

    def block_forward(self, region: str, block: nn.Module, eager: Callable) -> Callable:
        """The forward of ``block`` (of ``region``): its graph for compiled keys, ``eager`` otherwise."""
        graphs = self.graphs.get(region, {})

        def forward(*args, **kwargs):
            key = call_key(args, kwargs)
            graph = graphs.get(key)
            if graph is None and graphs:
                args, graph = _projected(block, graphs, args, kwargs)
            self.counters.region_calls += 1
            if graph is None:
                self.counters.region_fallbacks += 1
                self._fell_back = True
                if key not in self._warned:
                    self._warned.add(key)
                    log.info("no compiled graph of %s for %s; running the block eagerly", region, key)
                return eager(*args, **kwargs)
            if self._fell_back is None:
                self._fell_back = False
            return graph(block, args, kwargs)

        return forward

    def begin(self) -> None:
        """A DiT forward starts (called by the stack's entry, outside any CUDA graph)."""
        self._fell_back = None

    def end(self, kwargs: dict[str, Any]) -> None:
        """A DiT forward ended; count it as compiled or as a fallback under its DiT call key."""
        key = call_key((), kwargs)
        fell_back = self._fell_back
        if fell_back is None:  # no block ran in Python: a CUDA graph replay of an earlier capture
            fell_back = self._outcome.get(key, key not in self.buckets)
        self._outcome[key] = fell_back
        self._fell_back = None
        if fell_back:
            self.counters.eager_fallbacks += 1
            self.counters.fallback_keys[key] = self.counters.fallback_keys.get(key, 0) + 1
        else:
            self.counters.compiled_calls += 1

    def forget_packed(self) -> None:
        """Drop every block's packed weight concatenations (after weights were replaced, not updated in place)."""
        for per_key in self.graphs.values():
            for graph in per_key.values():
                graph.forget()

    def describe(self) -> dict[str, Any]:
        return {**self.info, "buckets": self.buckets,
                "regions": {r: len(g) for r, g in self.graphs.items()}, **dataclasses.asdict(self.counters)}


def _projected(block: nn.Module, graphs: dict[str, RegionGraph], args: tuple, kwargs: dict[str, Any]):
    """``(args, graph)`` for a block called with the conditioning (``temb``) whose graphs take its precomputed
    modulation instead (:mod:`diffc.models.modulation`; graphs compiled for a resident pipeline, run under
    offload, where the pipeline cannot precompute it): the block's projection computed here, in its forward
    (offload has brought its weights), and the graph for that call; ``(args, None)`` when there is none (or the
    call's ``temb`` is a projection already: ``block.modulation`` gives None)."""
    project = getattr(block, "modulation", None)
    position = _temb_position(type(block))
    if project is None or position is None or position >= len(args) or not isinstance(args[position], torch.Tensor):
        return args, None
    modulation = project(args[position])
    if modulation is None:  # the call passes the projection already
        return args, None
    projected = (*args[:position], modulation, *args[position + 1:])
    graph = graphs.get(call_key(projected, kwargs))
    return (projected, graph) if graph is not None else (args, None)


@functools.cache
def _temb_position(cls: type) -> int | None:
    names = [p.name for p in forward_parameters(cls)]
    return names.index("temb") if "temb" in names else None


def fallback_warning(compiled: CompiledDiT, before: int) -> str | None:
    """A user-facing warning when DiT calls since ``before`` (an ``eager_fallbacks`` count) ran eagerly."""
    n = compiled.counters.eager_fallbacks - before
    if n <= 0:
        return None
    shapes = "; ".join(_shape_text(k) for k in list(compiled.counters.fallback_keys)[-1:])
    compiled_shapes = " | ".join(_shape_text(k) for k in compiled.buckets)
    return (f"the compiled DiT has no graph for this shape, so {n} DiT call(s) ran eagerly (slower). "
            f"This call: {shapes}. Compiled: {compiled_shapes}. Compile this shape with `diffc compile`.")


def _shape_text(key: str) -> str:
    keep = ("hidden_states", "encoder_hidden_states")
    parts = [p.split("=", 1) for p in key.split(",") if "=" in p]
    return " ".join(f"{name} {value.split(':')[0]}" for name, value in parts if name in keep)
