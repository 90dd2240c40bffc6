"""Fuse the gated residual ``x + gate * y`` into ``torch.ops.diffc.gated_residual``.

Unfused (export's ATen, after :mod:`.canonicalize`)::

    out = aten.add(x, aten.mul(gate, y))     # FLUX: hidden + gate.unsqueeze(1) * attn / ff / proj_out
    out = aten.add(x, aten.mul(y, gate))     # Wan in float32: x + attn1(h) * gate, x + ffn(h) * c_gate

Fused::

    out = aten.empty_like(x)
    diffc.gated_residual(x, y, gate, out)

The sum may be written product first, ``gate * y + x`` (either operand order of the product).
Variant: Wan in bf16/fp16 computes ``(x.float() + y * gate).type_as(x)`` with float32 gates (the
feed-forward's ``y`` upcast too): ``to(add(to(x, float32), mul(y, gate)), x.dtype)``, which the op
computes the same way from the low-precision ``x`` and ``y``.
Filters keep the op's contract: x, y (B, S, C) of one shape, gate (B or 1, 1 or S, C), and the sum
stored in x's dtype, which leaves out RoPE's 4-D ``a * cos + b * sin`` and other adds of products.
"""

from __future__ import annotations

import torch

from .adaln_modulate import REDUCED, modulation_ok, rows_ok
from .base import FusionPass, Pattern

aten = torch.ops.aten


def _residual_ok(x, y, gate, result_dtype) -> bool:
    return (
        all(isinstance(t, torch.Tensor) for t in (x, y, gate))
        and rows_ok(x)
        and rows_ok(y)
        and tuple(y.shape) == tuple(x.shape)
        and modulation_ok(gate, x)
        and result_dtype == x.dtype
    )


def _promoted(x, y, gate):
    """The sum's dtype; None where an operand is a Python number (``x + 2.0 * y`` is not a gated residual)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, y, gate)):
        return None
    return torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))


def _example(dtype=torch.float32) -> tuple:
    g = torch.Generator().manual_seed(0)
    x, y, gate = (torch.randn(s, generator=g) for s in ((2, 5, 8), (2, 5, 8), (2, 1, 8)))
    return x.to(dtype), y.to(dtype), gate


class GateFirst(Pattern):
    """FLUX: ``x + gate * y``, everything in the activations' dtype."""

    def example_inputs(self) -> tuple:
        x, y, gate = _example()
        return x, gate, y

    @staticmethod
    def pattern(x, gate, y):
        return aten.add.Tensor(x, aten.mul.Tensor(gate, y))

    @staticmethod
    def replacement(x, gate, y):
        out = aten.empty_like.default(x)
        torch.ops.diffc.gated_residual.default(x, y, gate, out)
        return out

    def accepts(self, x, gate, y) -> bool:
        return _residual_ok(x, y, gate, _promoted(x, y, gate))


class GateLast(Pattern):
    """Wan in float32: ``x + y * gate``."""

    def example_inputs(self) -> tuple:
        return _example()

    @staticmethod
    def pattern(x, y, gate):
        return aten.add.Tensor(x, aten.mul.Tensor(y, gate))

    @staticmethod
    def replacement(x, y, gate):
        out = aten.empty_like.default(x)
        torch.ops.diffc.gated_residual.default(x, y, gate, out)
        return out

    def accepts(self, x, y, gate) -> bool:
        return _residual_ok(x, y, gate, _promoted(x, y, gate))


class ProductFirst(GateFirst):
    """``gate * y + x``: the sum written product first (diffusers' HunyuanVideo single block,
    ``hidden = gate.unsqueeze(1) * proj_out(h); hidden = hidden + residual``)."""

    @staticmethod
    def pattern(x, gate, y):
        return aten.add.Tensor(aten.mul.Tensor(gate, y), x)


class ProductFirstGateLast(GateLast):
    """``y * gate + x``."""

    @staticmethod
    def pattern(x, y, gate):
        return aten.add.Tensor(aten.mul.Tensor(y, gate), x)


class GateLastUpcast(Pattern):
    """Wan attention in bf16/fp16: ``to(to(x, float32) + y * gate, x.dtype)`` with a float32 gate."""

    def example_inputs(self) -> tuple:
        return (*_example(torch.bfloat16), torch.float32, torch.bfloat16)

    @staticmethod
    def pattern(x, y, gate, upcast, downcast):
        return aten.to.dtype(aten.add.Tensor(aten.to.dtype(x, upcast), aten.mul.Tensor(y, gate)), downcast)

    @staticmethod
    def replacement(x, y, gate, upcast, downcast):
        out = aten.empty_like.default(x)
        torch.ops.diffc.gated_residual.default(x, y, gate, out)
        return out

    def accepts(self, x, y, gate, upcast, downcast) -> bool:
        return (
            x.dtype in REDUCED
            and upcast == torch.float32
            and downcast == x.dtype
            and y.dtype == x.dtype
            and gate.dtype == torch.float32
            and _residual_ok(x, y, gate, x.dtype)
        )


class GateLastUpcastBoth(GateLastUpcast):
    """Wan feed-forward in bf16/fp16: ``to(to(x, float32) + to(y, float32) * gate, x.dtype)``."""

    @staticmethod
    def pattern(x, y, gate, upcast, downcast):
        product = aten.mul.Tensor(aten.to.dtype(y, upcast), gate)
        return aten.to.dtype(aten.add.Tensor(aten.to.dtype(x, upcast), product), downcast)


class GatedResidualPass(FusionPass):
    """``x + gate * y`` -> ``diffc.gated_residual``. Not bit-exact: the GPU kernel may contract the
    float32 multiply-add into one FMA where eager rounds the product first."""

    name = "gated_residual"
    bit_exact = False
    patterns = (GateLastUpcastBoth(), GateLastUpcast(), GateFirst(), GateLast(), ProductFirst(), ProductFirstGateLast())
