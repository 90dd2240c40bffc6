"""Fuse the affine-free LayerNorm and its modulation into ``torch.ops.diffc.adaln_modulate``.

Unfused (export's ATen, after :mod:`.canonicalize`)::

    h   = aten.layer_norm(x, [C], None, None, eps, False)
    m   = aten.mul(h, aten.add(scale, 1))          # FLUX AdaNormZero, Wan norm1/norm3 (float32)
    out = aten.add(m, shift)

Fused::

    out = aten.empty_like(x)
    diffc.adaln_modulate(x, scale, shift, eps, out)

Variants: an affine LayerNorm (weight and bias) modulated by a precomputed ``1 + scale`` folds its affine
into the modulation (:class:`AdaLNModulateAffine`); an affine float32 LayerNorm with no modulation is the op
with ``scale = w - 1``, ``shift = b`` (:class:`AffineLayerNormUpcast`, :class:`AffineLayerNorm`: Wan's
``norm2``; the modulated patterns come first, so an affine norm that is modulated folds as above); FLUX's ``AdaNormContinuous`` unsqueezes after adding one (``(1 + scale)[:, None, :]``);
Wan in bf16/fp16 wraps the sequence in casts, ``to(layer_norm(to(x, float32)) * ... , x.dtype)``
with float32 scale and shift, which the op computes the same way from the low-precision ``x``.
"""

from __future__ import annotations

import torch

from .base import FusionPass, Pattern

aten = torch.ops.aten
REDUCED = (torch.bfloat16, torch.float16)


def _dense_last(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def modulation_ok(t, x: torch.Tensor) -> bool:
    """A (B or 1, 1 or S, C) floating tensor with a dense last dimension, as the fused ops take."""
    batch, seq, dim = x.shape
    return (
        isinstance(t, torch.Tensor)
        and t.ndim == 3
        and t.shape[0] in (1, batch)
        and t.shape[1] in (1, seq)
        and t.shape[2] == dim
        and t.dtype.is_floating_point
        and _dense_last(t)
    )


def rows_ok(x) -> bool:
    """A (B, S, C) floating activation with a dense last dimension."""
    return isinstance(x, torch.Tensor) and x.ndim == 3 and x.dtype.is_floating_point and _dense_last(x)


def _norm_ok(x, shape, eps) -> bool:
    return rows_ok(x) and list(shape) == [x.shape[-1]] and isinstance(eps, float)


def _upcast_norm_ok(x, shape, eps, upcast, downcast) -> bool:
    """A LayerNorm computed in float32 on bf16/fp16 activations, its result cast back to their dtype."""
    return _norm_ok(x, shape, eps) and x.dtype in REDUCED and upcast == torch.float32 and downcast == x.dtype


def _float32_affine_ok(x, weight, bias) -> bool:
    """The LayerNorm's own weight and bias: float32 (C,), dense."""
    return all(isinstance(t, torch.Tensor) and tuple(t.shape) == (x.shape[-1],) and t.dtype == torch.float32
               and _dense_last(t) for t in (weight, bias))


class AdaLNModulate(Pattern):
    """``layer_norm(x) * (1 + scale) + shift`` with scale, shift in x's dtype (FLUX; Wan in float32)."""

    def example_inputs(self) -> tuple:
        g = torch.Generator().manual_seed(0)
        x, scale, shift = (torch.randn(s, generator=g) for s in ((2, 5, 8), (2, 1, 8), (2, 1, 8)))
        return x, scale, shift, [8], 1e-6

    @staticmethod
    def pattern(x, scale, shift, shape, eps):
        h = aten.layer_norm.default(x, shape, None, None, eps, False)
        return aten.add.Tensor(aten.mul.Tensor(h, aten.add.Tensor(scale, 1)), shift)

    @staticmethod
    def replacement(x, scale, shift, shape, eps):
        out = aten.empty_like.default(x)
        torch.ops.diffc.adaln_modulate.default(x, scale, shift, eps, out)
        return out

    def accepts(self, x, scale, shift, shape, eps) -> bool:
        return (
            _norm_ok(x, shape, eps)
            and modulation_ok(scale, x)
            and modulation_ok(shift, x)
            and scale.dtype == shift.dtype == x.dtype
        )


class AdaLNModulateUnsqueezed(AdaLNModulate):
    """FLUX ``AdaNormContinuous``: ``layer_norm(x) * (1 + scale)[:, None] + shift`` with scale (B, C)."""

    def example_inputs(self) -> tuple:
        x, scale, shift, shape, eps = super().example_inputs()
        return x, scale[:, 0], shift, shape, eps

    @staticmethod
    def pattern(x, scale, shift, shape, eps):
        h = aten.layer_norm.default(x, shape, None, None, eps, False)
        one_plus = aten.unsqueeze.default(aten.add.Tensor(scale, 1), 1)
        return aten.add.Tensor(aten.mul.Tensor(h, one_plus), shift)

    @staticmethod
    def replacement(x, scale, shift, shape, eps):
        out = aten.empty_like.default(x)
        torch.ops.diffc.adaln_modulate.default(x, aten.unsqueeze.default(scale, 1), shift, eps, out)
        return out

    def accepts(self, x, scale, shift, shape, eps) -> bool:
        return (
            _norm_ok(x, shape, eps)
            and isinstance(scale, torch.Tensor)
            and scale.ndim == 2
            and scale.shape[0] in (1, x.shape[0])
            and scale.shape[1] == x.shape[2]
            and _dense_last(scale)
            and modulation_ok(shift, x)
            and scale.dtype == shift.dtype == x.dtype
        )


class AdaLNModulateUpcast(Pattern):
    """Wan in bf16/fp16: ``to(layer_norm(to(x, float32)) * (1 + scale) + shift, x.dtype)``, scale/shift float32."""

    def example_inputs(self) -> tuple:
        x, scale, shift, shape, eps = AdaLNModulate().example_inputs()
        return x.bfloat16(), scale, shift, shape, eps, torch.float32, torch.bfloat16

    @staticmethod
    def pattern(x, scale, shift, shape, eps, upcast, downcast):
        h = aten.layer_norm.default(aten.to.dtype(x, upcast), shape, None, None, eps, False)
        m = aten.add.Tensor(aten.mul.Tensor(h, aten.add.Tensor(scale, 1)), shift)
        return aten.to.dtype(m, downcast)

    @staticmethod
    def replacement(x, scale, shift, shape, eps, upcast, downcast):
        out = aten.empty_like.default(x)
        torch.ops.diffc.adaln_modulate.default(x, scale, shift, eps, out)
        return out

    def accepts(self, x, scale, shift, shape, eps, upcast, downcast) -> bool:
        return (
            _upcast_norm_ok(x, shape, eps, upcast, downcast)
            and modulation_ok(scale, x)
            and modulation_ok(shift, x)
            and scale.dtype == shift.dtype == torch.float32
        )


class AdaLNModulateAffine(Pattern):
    """An affine LayerNorm modulated, ``layer_norm(x, w, b) * m + shift`` with ``m`` the model's ``1 + scale``
    (e.g. diffusers' ``CogVideoXLayerNormZero``: ``norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]``).
    Folded onto the affine-free op: ``n * w * m + (b * m + shift)`` is ``adaln_modulate`` with
    ``scale = w * m - 1`` and ``shift = b * m + shift``, computed in float32 on the small (B, 1, C) tensors."""

    def example_inputs(self) -> tuple:
        g = torch.Generator().manual_seed(0)
        x, m, shift = (torch.randn(s, generator=g) for s in ((2, 5, 8), (2, 1, 8), (2, 1, 8)))
        w, b = 1 + 0.3 * torch.randn(8, generator=g), 0.1 * torch.randn(8, generator=g)
        return x, w, b, m, shift, [8], 1e-5

    @staticmethod
    def pattern(x, weight, bias, m, shift, shape, eps):
        h = aten.layer_norm.default(x, shape, weight, bias, eps, False)
        return aten.add.Tensor(aten.mul.Tensor(h, m), shift)

    @staticmethod
    def replacement(x, weight, bias, m, shift, shape, eps):
        scale = aten.sub.Tensor(aten.mul.Tensor(m, weight), 1)
        out = aten.empty_like.default(x)
        torch.ops.diffc.adaln_modulate.default(x, scale, aten.add.Tensor(aten.mul.Tensor(m, bias), shift), eps, out)
        return out

    def build_replacement(self, x, weight, bias, m, shift, shape, eps):
        if x.dtype == torch.float32:
            return self.replacement
        f32 = torch.float32

        def replacement(x, weight, bias, m, shift, shape, eps):
            m32 = aten.to.dtype(m, f32)
            scale = aten.sub.Tensor(aten.mul.Tensor(m32, aten.to.dtype(weight, f32)), 1)
            shift32 = aten.add.Tensor(aten.mul.Tensor(m32, aten.to.dtype(bias, f32)), aten.to.dtype(shift, f32))
            out = aten.empty_like.default(x)
            torch.ops.diffc.adaln_modulate.default(x, scale, shift32, eps, out)
            return out

        return replacement

    def accepts(self, x, weight, bias, m, shift, shape, eps) -> bool:
        return (
            _norm_ok(x, shape, eps)
            and all(isinstance(t, torch.Tensor) and tuple(t.shape) == (x.shape[-1],) and t.dtype == x.dtype
                    for t in (weight, bias))
            and modulation_ok(m, x)
            and modulation_ok(shift, x)
            and m.dtype == shift.dtype == x.dtype
        )


class AffineLayerNormUpcast(Pattern):
    """An affine LayerNorm computed in float32 on low-precision activations, no modulation (Wan's ``norm2``
    before cross-attention, diffusers' ``FP32LayerNorm``): ``to(layer_norm(to(x, float32), w, b), x.dtype)``
    with float32 ``w``, ``b`` (C,). It is ``adaln_modulate`` with ``scale = w - 1`` and ``shift = b`` as
    (1, 1, C) rows (``1 + (w - 1)`` is ``w`` exactly for weights in [0.5, 2], within a float32 rounding
    otherwise), so the residual fusion downstream can pair it like the modulated norms, and the fp8 tier
    quantizes its output in the same pass."""

    def example_inputs(self) -> tuple:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 8, generator=g).bfloat16()
        w, b = 1 + 0.3 * torch.randn(8, generator=g), 0.1 * torch.randn(8, generator=g)
        return x, w, b, [8], 1e-6, torch.float32, torch.bfloat16

    @staticmethod
    def pattern(x, weight, bias, shape, eps, upcast, downcast):
        h = aten.layer_norm.default(aten.to.dtype(x, upcast), shape, weight, bias, eps, False)
        return aten.to.dtype(h, downcast)

    @staticmethod
    def replacement(x, weight, bias, shape, eps, upcast, downcast):
        scale = aten.unsqueeze.default(aten.unsqueeze.default(aten.sub.Tensor(weight, 1), 0), 0)
        shift = aten.unsqueeze.default(aten.unsqueeze.default(bias, 0), 0)
        out = aten.empty_like.default(x)
        torch.ops.diffc.adaln_modulate.default(x, scale, shift, eps, out)
        return out

    def accepts(self, x, weight, bias, shape, eps, upcast, downcast) -> bool:
        return _upcast_norm_ok(x, shape, eps, upcast, downcast) and _float32_affine_ok(x, weight, bias)


class AffineLayerNorm(AffineLayerNormUpcast):
    """:class:`AffineLayerNormUpcast` on float32 activations (no casts around it): ``layer_norm(x, w, b)``."""

    def example_inputs(self) -> tuple:
        x, w, b, shape, eps, _, _ = super().example_inputs()
        return x.float(), w, b, shape, eps

    @staticmethod
    def pattern(x, weight, bias, shape, eps):
        return aten.layer_norm.default(x, shape, weight, bias, eps, False)

    @staticmethod
    def replacement(x, weight, bias, shape, eps):
        return AffineLayerNormUpcast.replacement(x, weight, bias, shape, eps, None, None)

    def accepts(self, x, weight, bias, shape, eps) -> bool:
        return _norm_ok(x, shape, eps) and x.dtype == torch.float32 and _float32_affine_ok(x, weight, bias)


class AdaLNModulatePass(FusionPass):
    """LayerNorm + ``* (1 + scale) + shift`` -> ``diffc.adaln_modulate``. Not bit-exact: the kernel's
    mean/variance reduction order differs from ATen's (within the bf16 tolerance)."""

    name = "adaln_modulate"
    bit_exact = False
    patterns = (AdaLNModulateUpcast(), AdaLNModulateUnsqueezed(), AdaLNModulate(), AdaLNModulateAffine(),
                AffineLayerNormUpcast(), AffineLayerNorm())
