"""Fuse the feed-forward's bias add and tanh-GELU into ``torch.ops.diffc.gelu_tanh``.

Unfused (FLUX ``ff.net.0`` / ``ff_context.net.0`` / ``proj_mlp``, Wan ``ffn.net.0`` and text projection)::

    h   = aten.linear(x, weight, bias)
    out = aten.gelu(h, approximate="tanh")

Fused (the bias moves out of the GEMM into the activation's single pass)::

    h   = aten.linear(x, weight, None)
    out = aten.empty_like(h)
    diffc.gelu_tanh(h, bias, out)

A ``gelu`` without a biased linear before it becomes ``diffc.gelu_tanh(h, None, out)``.

On a GPU the biased form goes into the GEMM instead (cuBLASLt's GELU epilogue: bias and tanh-GELU
applied to the float32 accumulator before the one rounding), which measured faster than GEMM + fused
kernel at every FLUX and Wan feed-forward size on an H200 (bench/ops/bench_gemm_gelu.py)::

    out = aten.view(aten._addmm_activation(bias, aten.view(x, [-1, K]), aten.t(weight), use_gelu=True), [..., N])
"""

from __future__ import annotations

import torch

from .base import FusionPass, Pattern

aten = torch.ops.aten


def _contiguous_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.ndim >= 1 and t.is_contiguous()


class LinearBiasGelu(Pattern):
    """``gelu(linear(x, weight, bias), approximate="tanh")`` with a (N,) bias in the activations' dtype."""

    def example_inputs(self) -> tuple:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(s, generator=g) for s in ((2, 5, 8), (12, 8), (12,)))

    @staticmethod
    def pattern(x, weight, bias):
        return aten.gelu.default(aten.linear.default(x, weight, bias), approximate="tanh")

    @staticmethod
    def replacement(x, weight, bias):
        h = aten.linear.default(x, weight)
        out = aten.empty_like.default(h)
        torch.ops.diffc.gelu_tanh.default(h, bias, out)
        return out

    def accepts(self, x, weight, bias) -> bool:
        return (
            isinstance(x, torch.Tensor)
            and isinstance(weight, torch.Tensor)
            and _contiguous_float(bias)
            and bias.shape == (weight.shape[0],)
            and bias.dtype == x.dtype == weight.dtype
        )


class LinearBiasGeluEpilogue(LinearBiasGelu):
    """The biased form lowered onto the GEMM's GELU epilogue (CUDA, or wherever the pass is told to)."""

    def __init__(self, any_device: bool = False):
        self.any_device = any_device

    @staticmethod
    def replacement(x, weight, bias):
        """The epilogue form on real tensors; the graph gets :meth:`build_replacement`'s copy with the
        match's sizes as constants (fx cannot put ``x.shape`` into an ATen graph)."""
        y = aten._addmm_activation.default(bias, x.reshape(-1, x.shape[-1]), aten.t.default(weight), use_gelu=True)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def accepts(self, x, weight, bias) -> bool:
        return (
            super().accepts(x, weight, bias)
            and x.ndim >= 2
            and x.is_contiguous()
            and weight.is_contiguous()
            and (self.any_device or x.device.type == "cuda")
        )

    def build_replacement(self, x, weight, bias):
        lead, k, n = list(x.shape[:-1]), x.shape[-1], weight.shape[0]

        def replacement(x, weight, bias):
            y = aten._addmm_activation.default(bias, aten.view.default(x, [-1, k]), aten.t.default(weight),
                                                use_gelu=True)
            return aten.view.default(y, [*lead, n])

        return replacement


class Gelu(Pattern):
    """``gelu(h, approximate="tanh")`` on a contiguous floating tensor."""

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0)),)

    @staticmethod
    def pattern(h):
        return aten.gelu.default(h, approximate="tanh")

    @staticmethod
    def replacement(h):
        out = aten.empty_like.default(h)
        torch.ops.diffc.gelu_tanh.default(h, None, out)
        return out

    def accepts(self, h) -> bool:
        return _contiguous_float(h)


class GeluTanhPass(FusionPass):
    """Bias + tanh-GELU -> ``diffc.gelu_tanh``. Not bit-exact: one rounding where eager rounds the
    biased GEMM output first, and ``tanh`` computed through ``exp``."""

    name = "gelu_tanh"
    bit_exact = False
    patterns = (LinearBiasGeluEpilogue(), LinearBiasGelu(), Gelu())

    def __init__(self, epilogue_anywhere: bool = False, epilogue: bool = True):
        """``epilogue_anywhere`` lowers the biased form onto ``_addmm_activation`` on any device (tests);
        ``epilogue=False`` never does (diffc's kernel adds the bias), for measuring the two forms."""
        if epilogue_anywhere:
            self.patterns = (LinearBiasGeluEpilogue(any_device=True), Gelu())
        elif not epilogue:
            self.patterns = (LinearBiasGelu(), Gelu())
