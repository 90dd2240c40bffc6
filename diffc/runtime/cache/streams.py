"""A block's residual streams, read from its call and written back, as its model declares them.

:class:`StreamIO` turns a region's :class:`~diffc.models.structure.BlockStreams` and its blocks' forward
signature into four fast operations: the stream values of a call (positional or keyword), the same call
with other stream values, the stream values a block returned, and the return value a block would give
for given stream values (what a skipped block hands on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...models.structure import BlockStreams, RegionError, forward_parameters


class StreamIO:
    """Reads and writes the streams of one region's block calls; values are in ``spec.inputs`` order."""

    def __init__(self, spec: BlockStreams, block: nn.Module):
        self.spec = spec
        self.names = tuple(spec.inputs)
        params = forward_parameters(type(block))
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        missing = [n for n in self.names if n not in positional]
        if missing:
            raise RegionError(f"{type(block).__name__}.forward has no parameter {missing[0]!r} that its "
                              f"model's _block_streams names; its parameters: {', '.join(positional)}")
        self.positions = tuple(positional.index(n) for n in self.names)
        self.bare = isinstance(spec.outputs, str)
        outputs = (spec.outputs,) if self.bare else tuple(spec.outputs)
        self.out_order = tuple(outputs.index(n) for n in self.names)  # stream i is output out_order[i]
        self.in_order = tuple(self.names.index(n) for n in outputs)  # output j is stream in_order[j]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def read(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The stream values of a call ``block(*args, **kwargs)``."""
        return tuple(args[p] if p < len(args) else kwargs[n] for n, p in zip(self.names, self.positions))

    def write(self, args: tuple, kwargs: dict, values: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        """The call with its streams replaced by ``values``."""
        args, kwargs = list(args), dict(kwargs)
        for name, pos, value in zip(self.names, self.positions, values):
            if pos < len(args):
                args[pos] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def split(self, out: Any) -> tuple[torch.Tensor, ...]:
        """The stream values a block returned."""
        if self.bare:
            return (out,)
        return tuple(out[j] for j in self.out_order)

    def output(self, values: tuple[torch.Tensor, ...]) -> Any:
        """What a block returns for stream ``values``."""
        if self.bare:
            return values[0]
        return tuple(values[i] for i in self.in_order)

    def passthrough(self, args: tuple, kwargs: dict) -> Any:
        """What a block that computes nothing returns: its input streams, as its output."""
        return self.output(self.read(args, kwargs))
