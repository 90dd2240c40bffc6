"""CUDA graphs under a step cache: one graph per segment of blocks that always run together.

A cache decides on the host between blocks, so the whole forward cannot be one graph. Instead each
segment (the first blocks, the middle blocks, the last blocks, within one region) is captured as one
graph: the segment's first block runs the whole segment (its blocks chained, each fed the previous
one's streams, every other argument shared) through a CUDA-graph wrapper, and the segment's other
blocks hand their input streams on unchanged (they receive the segment's output). When the cache
skips the middle, its blocks are never called, and their segment's graph does not replay.

Graph keys are the segment call's tensors and values flattened (``torch.utils._pytree``: the RoPE
tables are a tuple), so the wrapper (``CudaGraphModule`` or a test's stand-in) sees plain arguments;
tensors are made contiguous first, so a stream that arrives as a view one step and as a fresh tensor
the next (after a skip) replays the same graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from .streams import StreamIO


class _Segment(nn.Module):
    """Runs blocks ``forwards`` in a chain; holds the blocks so the graph wrapper sees their weights."""

    def __init__(self, blocks: list[nn.Module], forwards: list[Callable], io: StreamIO, specs: list):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self._forwards, self._io, self._specs = forwards, io, specs

    def forward(self, spec_id: int, *leaves):
        args, kwargs = pytree.tree_unflatten(list(leaves), self._specs[spec_id])
        out = None
        for i, forward in enumerate(self._forwards):
            if i:
                args, kwargs = self._io.write(args, kwargs, self._io.split(out))
            out = forward(*args, **kwargs)
        return out


def _handing_on(io: StreamIO) -> Callable:
    def forward(*args, **kwargs):
        return io.passthrough(args, kwargs)
    return forward


class SegmentGraphs:
    """The CUDA-graph layer of a DiT stack whose step cache decides between blocks."""

    mode = "block segments"

    def __init__(self, segments: list[tuple[str, int, int]], streams: dict[str, StreamIO], graph_class):
        self.segments, self.streams, self.graph_class = list(segments), streams, graph_class
        self.graphs: list[tuple[str, Any]] = []  # (label, graph wrapper)
        self._specs: list = []

    def wrap(self, blocks: dict[tuple[str, int], nn.Module],
             forwards: dict[tuple[str, int], Callable]) -> dict[tuple[str, int], Callable]:
        """Per block, the forward that runs its segment's graph (first block) or hands its streams on."""
        self.reset()
        self.graphs = []
        out: dict[tuple[str, int], Callable] = {}
        for region, start, stop in self.segments:
            io = self.streams[region]
            keys = [(region, i) for i in range(start, stop)]
            graph = self.graph_class(_Segment([blocks[k] for k in keys], [forwards[k] for k in keys], io, self._specs))
            self.graphs.append((f"{region}[{start}:{stop}]", graph))
            out[keys[0]] = self._runner(graph)
            for key in keys[1:]:
                out[key] = _handing_on(io)
        return out

    def _runner(self, graph) -> Callable:
        def run(*args, **kwargs):
            leaves, spec = pytree.tree_flatten((args, kwargs))
            # one key whether a stream arrives as a view (FLUX's split outputs) or fresh (a skip's sum)
            leaves = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in leaves]
            try:
                spec_id = self._specs.index(spec)
            except ValueError:
                self._specs.append(spec)
                spec_id = len(self._specs) - 1
            return graph(spec_id, *leaves)
        return run

    def reset(self) -> None:
        for _, graph in self.graphs:
            graph.reset()

    def describe(self) -> dict[str, Any]:
        parts = {label: graph.describe() for label, graph in self.graphs}
        totals = {k: sum(p.get(k, 0) for p in parts.values()) for k in ("captures", "replays", "fallbacks")}
        reasons: dict[str, int] = {}
        for p in parts.values():
            for reason, n in p.get("fallback_reasons", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        return {"enabled": True, "mode": self.mode, **totals, "fallback_reasons": reasons,
                "segments": {label: {k: p.get(k) for k in ("captures", "replays", "fallbacks")}
                             for label, p in parts.items()}}
