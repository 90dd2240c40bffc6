"""Fuse the SwiGLU gate ``silu(a) * b`` over the two halves of one tensor into ``torch.ops.diffc.silu_mul``.

Unfused (a gated feed-forward with one up-projection, ``a, b = proj(x).chunk(2, -1)``; export's ATen)::

    parts = aten.chunk(h, 2, -1)                     # or aten.split(h, C, -1), aten.split_with_sizes(h, [C, C], -1)
    a, b  = parts[0], parts[1]                       # or aten.slice(h, -1, 0, C), aten.slice(h, -1, C, MAX)
    out   = aten.mul(aten.silu(a), b)                # or aten.mul(b, aten.silu(a))

Fused::

    out = aten.new_empty(h, [..., C])
    diffc.silu_mul(h, out)

The op gates the *first* half, so diffusers' ``SwiGLU`` (``h, gate = x.chunk(2); h * silu(gate)``, the
second half gated) is left alone, as is the two-projection form ``silu(gate_proj(x)) * up_proj(x)``
(Llama, Qwen-Image's text encoder): the op reads one ``[a | b]`` tensor, and joining the two GEMMs
is a weight re-layout, not this pass. FLUX.1 and Wan2.1 have no SwiGLU (their MLPs are GELU-tanh).
Filters: ``h`` contiguous floating with an even last dimension, split into exactly two equal halves
along it.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable

import torch
from torch import fx

from ...errors import InvalidArgumentError
from .base import FusionPass, Pattern

aten = torch.ops.aten
SLICE_END = sys.maxsize  # export's stop for an open slice ``h[..., C:]``


def _chunk(h, k, dim):
    parts = aten.chunk.default(h, k, dim)
    return operator.getitem(parts, 0), operator.getitem(parts, 1)


def _split(h, k, dim):
    parts = aten.split.Tensor(h, k, dim)
    return operator.getitem(parts, 0), operator.getitem(parts, 1)


def _split_with_sizes(h, k, dim):
    parts = aten.split_with_sizes.default(h, k, dim)
    return operator.getitem(parts, 0), operator.getitem(parts, 1)


def _slices(h, k, dim):
    return aten.slice.Tensor(h, dim, 0, k), aten.slice.Tensor(h, dim, k, SLICE_END)


# How the halves are taken, and the value of the wildcard ``k`` that makes them two equal halves of C each.
HALVES: dict[str, tuple[Callable, Callable[[int], object]]] = {
    "chunk": (_chunk, lambda c: 2),
    "split": (_split, lambda c: c),
    "split_with_sizes": (_split_with_sizes, lambda c: [c, c]),
    "slices": (_slices, lambda c: c),
}


class SiluMul(Pattern):
    """``silu(a) * b`` (or ``b * silu(a)``) with ``a, b`` the halves of ``h`` taken by ``halves``."""

    def __init__(self, halves: str, gate_first: bool = True):
        if halves not in HALVES:
            raise InvalidArgumentError("halves", f"expected one of {', '.join(HALVES)}, got {halves!r}")
        if not isinstance(gate_first, bool):
            raise InvalidArgumentError("gate_first", f"expected a bool, got {gate_first!r}")
        self.halves = halves
        self.gate_first = gate_first

    @property
    def name(self) -> str:
        return f"SiluMul[{self.halves},{'silu_a*b' if self.gate_first else 'b*silu_a'}]"

    def example_inputs(self) -> tuple:
        h = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
        return h, HALVES[self.halves][1](6), -1

    @property
    def pattern(self) -> Callable:
        take, gate_first = HALVES[self.halves][0], self.gate_first

        def pattern(h, k, dim):
            a, b = take(h, k, dim)
            gated = aten.silu.default(a)
            return aten.mul.Tensor(gated, b) if gate_first else aten.mul.Tensor(b, gated)

        return pattern

    @property
    def replacement(self) -> Callable:
        """The replacement at the example inputs' sizes (the pass builds one per match)."""
        return self.build_replacement(**dict(zip(("h", "k", "dim"), self.example_inputs())))

    def build_replacement(self, h, k, dim) -> Callable:
        size = [*h.shape[:-1], h.shape[-1] // 2]

        def replacement(h, k, dim):
            out = aten.new_empty.default(h, size)  # (..., C)
            torch.ops.diffc.silu_mul.default(h, out)
            return out

        return replacement

    def accepts(self, h, k, dim) -> bool:
        if not (isinstance(h, torch.Tensor) and h.ndim >= 1 and h.dtype.is_floating_point and h.is_contiguous()):
            return False
        width = h.shape[-1]
        if width == 0 or width % 2 or dim not in (-1, h.ndim - 1):
            return False
        return k == HALVES[self.halves][1](width // 2)


class SiluMulPass(FusionPass):
    """SwiGLU ``silu(a) * b`` over one tensor's halves -> ``diffc.silu_mul``. Not bit-exact: one rounding
    where eager rounds ``silu(a)`` first, and ``silu`` computed through ``exp``."""

    name = "silu_mul"
    bit_exact = False
    patterns = tuple(SiluMul(halves, gate_first) for halves in HALVES for gate_first in (True, False))

    def __call__(self, gm: fx.GraphModule) -> int:
        if not isinstance(gm, fx.GraphModule):
            raise InvalidArgumentError("gm", f"expected a torch.fx.GraphModule, got {type(gm).__name__}")
        return super().__call__(gm)
