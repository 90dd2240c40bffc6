"""Rewrite RMSNorm spelled out in elementwise ops into one ``aten.rms_norm``.

diffusers' ``RMSNorm`` module (and transformers' Llama/T5 norms) compute the norm by hand; export
records the pieces (float32 statistics, after :mod:`.canonicalize`)::

    var = aten.mean(aten.pow(x, 2), [-1], True)          # x: (..., C); bf16/fp16: pow(to(x, float32), 2)
    h   = aten.mul(x, aten.rsqrt(aten.add(var, eps)))    # bf16/fp16: then to(h, x.dtype)
    out = aten.mul(h, weight)                            # or weight first; no weight: out = h

One op instead, which the fused-norm patterns downstream (:mod:`.qk_norm_rope`) are written against and
which is one kernel on a GPU::

    out = aten.rms_norm(x, [C], weight, eps)             # weight None without an affine

Filters: a floating ``x`` normalised over its last dimension, a weight of shape (C,) in x's dtype.
Not bit-exact: ``aten.rms_norm`` multiplies by the weight before its one rounding where the
spelled-out bf16 form rounds the normalised value first.
"""

from __future__ import annotations

import torch

from .base import FusionPass, Pattern

aten = torch.ops.aten
REDUCED = (torch.bfloat16, torch.float16)


def _normalised(x, stats, exponent, dims, eps):
    """``x * rsqrt(mean(stats ** 2, dims, keepdim=True) + eps)``."""
    var = aten.mean.dim(aten.pow.Tensor_Scalar(stats, exponent), dims, True)
    return aten.mul.Tensor(x, aten.rsqrt.default(aten.add.Tensor(var, eps)))


def _stats_ok(x, exponent, dims, eps) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.ndim >= 1
        and x.dtype.is_floating_point
        and x.shape[-1] > 0
        and exponent == 2
        and isinstance(eps, float)
        and list(dims) in ([-1], [x.ndim - 1])
    )


def _weight_ok(weight, x) -> bool:
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (x.shape[-1],) and weight.dtype == x.dtype


def _example(dtype=torch.float32, weight=True) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(8, generator=g)).to(dtype)
    return (x, w) if weight else (x,)


class Weighted(Pattern):
    """float32: ``x * rsqrt(mean(x**2) + eps) * weight`` (diffusers ``RMSNorm`` with an affine)."""

    def example_inputs(self) -> tuple:
        return (*_example(), 2, [-1], 1e-6)

    @staticmethod
    def pattern(x, weight, exponent, dims, eps):
        return aten.mul.Tensor(_normalised(x, x, exponent, dims, eps), weight)

    @staticmethod
    def replacement(x, weight, exponent, dims, eps):
        return aten.rms_norm.default(x, [x.shape[-1]], weight, eps)

    def build_replacement(self, x, weight, exponent, dims, eps):
        shape = [x.shape[-1]]

        def replacement(x, weight, exponent, dims, eps):
            return aten.rms_norm.default(x, shape, weight, eps)

        return replacement

    def accepts(self, x, weight, exponent, dims, eps) -> bool:
        return _stats_ok(x, exponent, dims, eps) and x.dtype == torch.float32 and _weight_ok(weight, x)


class WeightFirst(Weighted):
    """float32: ``weight * (x * rsqrt(mean(x**2) + eps))`` (transformers' Llama / T5 norms)."""

    @staticmethod
    def pattern(x, weight, exponent, dims, eps):
        return aten.mul.Tensor(weight, _normalised(x, x, exponent, dims, eps))


class WeightedCast(Pattern):
    """bf16/fp16: ``to(x * rsqrt(mean(to(x, float32)**2) + eps), x.dtype) * weight``, weight in x's dtype."""

    def example_inputs(self) -> tuple:
        return (*_example(torch.bfloat16), torch.float32, 2, [-1], 1e-6, torch.bfloat16)

    @staticmethod
    def pattern(x, weight, upcast, exponent, dims, eps, downcast):
        h = _normalised(x, aten.to.dtype(x, upcast), exponent, dims, eps)
        return aten.mul.Tensor(aten.to.dtype(h, downcast), weight)

    @staticmethod
    def replacement(x, weight, upcast, exponent, dims, eps, downcast):
        return aten.rms_norm.default(x, [x.shape[-1]], weight, eps)

    def build_replacement(self, x, weight, upcast, exponent, dims, eps, downcast):
        shape = [x.shape[-1]]

        def replacement(x, weight, upcast, exponent, dims, eps, downcast):
            return aten.rms_norm.default(x, shape, weight, eps)

        return replacement

    def accepts(self, x, weight, upcast, exponent, dims, eps, downcast) -> bool:
        return (_stats_ok(x, exponent, dims, eps) and x.dtype in REDUCED and upcast == torch.float32
                and downcast == x.dtype and _weight_ok(weight, x))


class Plain(Pattern):
    """float32, no affine: ``x * rsqrt(mean(x**2) + eps)``."""

    def example_inputs(self) -> tuple:
        return (*_example(weight=False), 2, [-1], 1e-6)

    @staticmethod
    def pattern(x, exponent, dims, eps):
        return _normalised(x, x, exponent, dims, eps)

    @staticmethod
    def replacement(x, exponent, dims, eps):
        return aten.rms_norm.default(x, [x.shape[-1]], None, eps)

    def build_replacement(self, x, exponent, dims, eps):
        shape = [x.shape[-1]]

        def replacement(x, exponent, dims, eps):
            return aten.rms_norm.default(x, shape, None, eps)

        return replacement

    def accepts(self, x, exponent, dims, eps) -> bool:
        return _stats_ok(x, exponent, dims, eps) and x.dtype == torch.float32


class PlainCast(Pattern):
    """bf16/fp16, no affine: ``to(x * rsqrt(mean(to(x, float32)**2) + eps), x.dtype)``."""

    def example_inputs(self) -> tuple:
        return (*_example(torch.bfloat16, weight=False), torch.float32, 2, [-1], 1e-6, torch.bfloat16)

    @staticmethod
    def pattern(x, upcast, exponent, dims, eps, downcast):
        return aten.to.dtype(_normalised(x, aten.to.dtype(x, upcast), exponent, dims, eps), downcast)

    @staticmethod
    def replacement(x, upcast, exponent, dims, eps, downcast):
        return aten.rms_norm.default(x, [x.shape[-1]], None, eps)

    def build_replacement(self, x, upcast, exponent, dims, eps, downcast):
        shape = [x.shape[-1]]

        def replacement(x, upcast, exponent, dims, eps, downcast):
            return aten.rms_norm.default(x, shape, None, eps)

        return replacement

    def accepts(self, x, upcast, exponent, dims, eps, downcast) -> bool:
        return (_stats_ok(x, exponent, dims, eps) and x.dtype in REDUCED and upcast == torch.float32
                and downcast == x.dtype)


class RMSNormPass(FusionPass):
    """RMSNorm written as ``pow``/``mean``/``rsqrt``/``mul`` -> ``aten.rms_norm``. Runs first, so the fusions
    written against ``aten.rms_norm`` (QK-norm + RoPE) see diffusers' and transformers' norms too."""

    name = "rms_norm"
    bit_exact = False
    patterns = (WeightedCast(), Weighted(), WeightFirst(), PlainCast(), Plain())


# --------------------------------------------------------------------------------------------------
# aten.rms_norm -> diffc.rms_norm


NARROW = 256  # rows this short (per-head norms: head_dim 64 or 128) run faster several to a program


class RMSNormKernel(Pattern):
    """``aten.rms_norm(x, [C], weight or None, eps)`` left after the larger fusions (q/k norms without RoPE,
    e.g. SD3's and HunyuanVideo's per-head norms on a transposed view) -> ``diffc.rms_norm``, which reads
    the view in place instead of copying it first."""

    def example_inputs(self) -> tuple:
        x = torch.randn(2, 6, 3, 8, generator=torch.Generator().manual_seed(0)).transpose(1, 2)
        return x, [8], torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5, 1e-6

    @staticmethod
    def pattern(x, shape, weight, eps):
        return aten.rms_norm.default(x, shape, weight, eps)

    @property
    def replacement(self):
        """The replacement at the example inputs' sizes (the pass builds one per match)."""
        return self.build_replacement(*self.example_inputs())

    def build_replacement(self, x, shape, weight, eps):
        size = list(x.shape)

        def replacement(x, shape, weight, eps):
            out = aten.new_empty.default(x, size)  # contiguous, x's dtype and device
            torch.ops.diffc.rms_norm.default(x, weight, eps, out)
            return out

        return replacement

    def accepts(self, x, shape, weight, eps) -> bool:
        from ...ops.rms_norm import MAX_DIMS, MAX_WIDTH

        if not (isinstance(x, torch.Tensor) and x.dtype.is_floating_point and 1 <= x.ndim <= MAX_DIMS):
            return False
        width = x.shape[-1]
        if list(shape) != [width] or not 1 <= width <= MAX_WIDTH or (width > 1 and x.stride(-1) != 1):
            return False
        if weight is not None and not (isinstance(weight, torch.Tensor) and tuple(weight.shape) == (width,)
                                       and weight.dtype == x.dtype):
            return False
        # where aten would copy a view first, or give each short row a block of its own; wide contiguous rows
        # (Wan's cross-attention norms, Z-Image's sandwich norms) are what aten's row kernel does well
        return isinstance(eps, float) and eps >= 0 and (width <= NARROW or not x.is_contiguous())


class RMSNormKernelPass(FusionPass):
    """``aten.rms_norm`` -> ``diffc.rms_norm`` (strided input read in place, ``BLOCK_R`` rows per program).
    Not bit-exact with aten's kernel: the sum of squares adds in another order."""

    name = "rms_norm_kernel"
    bit_exact = False
    patterns = (RMSNormKernel(),)
