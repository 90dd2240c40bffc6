"""``out += x @ weight^T`` in the GEMM itself (cuBLAS with beta = 1), for a linear layer split over its input.

A single-stream DiT block (FLUX.1's, HunyuanVideo's) concatenates the attention output and the MLP's hidden
activation along the features and projects the concatenation once::

    out = linear(cat([attn, mlp], -1), W, b)        # FLUX.1: (4608, 3072) and (4608, 12288) -> (4608, 15360)

The concatenation copies both inputs (~280 MB of traffic at FLUX.1's size) for a GEMM that could read them
where they are. Split over the weight's columns, the same product is one GEMM per input, each later one
accumulating into the first's output::

    out = linear(attn, W[:, :3072], b)
    linear_accumulate(mlp, W[:, 3072:], out)          # out += mlp @ W[:, 3072:]^T

The weight slices are views (a leading dimension larger than their width, which cuBLAS takes as it is); the
accumulation reads and writes ``out`` once more (56 MB at FLUX.1's size). Numerics: each GEMM accumulates in
float32 and rounds once, so ``out`` is rounded to its dtype once more than the single GEMM rounds it
(:class:`diffc.compile.passes.split_cat_linear.SplitCatLinearPass` is not bit-exact).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .registry import expect_dtype, expect_float, expect_same_device, expect_shape, expect_unit_last_stride, register_op


def linear_accumulate_ref(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out + x @ weight^T`` summed in float32, rounded once to ``out``'s dtype."""
    return (out.float() + x.float() @ weight.float().t()).to(out.dtype)


def check_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """The checks a GEMM op writing ``out = x @ weight^T (...)`` shares: x (..., rows, K) float, weight (N, K) of x's
    dtype with a unit last stride, out (..., rows, N) of x's dtype."""
    expect_float("x", x)
    if x.ndim < 2:
        raise InvalidArgumentError("x", f"expected (..., rows, in_features), got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != k:
        raise InvalidArgumentError("weight", f"expected shape (out_features, {k}), got {tuple(weight.shape)}")
    expect_dtype("weight", weight, x.dtype)
    expect_unit_last_stride("weight", weight)
    expect_shape("out", out, (*x.shape[:-1], weight.shape[0]))
    expect_dtype("out", out, x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    check_linear(x, weight, out)
    if not out.is_contiguous():
        raise InvalidArgumentError("out", "must be contiguous (the GEMM accumulates into it in place)")
    expect_same_device({"x": x, "weight": weight, "out": out})


def _linear_accumulate_into_ref(x, weight, out) -> None:
    out.copy_(linear_accumulate_ref(x, weight, out))


@register_op("linear_accumulate", mutates_args=("out",), fake=_check, fallback=_linear_accumulate_into_ref,
             runs=lambda device: True)
def _linear_accumulate_launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    _check(x, weight, out)
    if out.numel() == 0:
        return
    n, k = weight.shape
    # beta = 1: the BLAS reads out, adds the product in float32 and writes out once
    out.view(-1, n).addmm_(x.reshape(-1, k), weight.t())


def linear_accumulate(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.ops.diffc.linear_accumulate``: ``out += x @ weight^T`` in place; returns ``out``."""
    torch.ops.diffc.linear_accumulate(x, weight, out)
    return out


__all__ = ["linear_accumulate", "linear_accumulate_ref"]
