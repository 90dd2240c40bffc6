"""``out[...] = x @ weight^T + bias``, written by the GEMM into a given tensor (a slice of a larger buffer).

A joint-attention block (FLUX.1's and Qwen-Image's double-stream blocks, HunyuanVideo's) projects the text and
the image values apart and concatenates them along the sequence::

    v = cat([linear(x_txt, w_txt, b_txt), linear(x_img, w_img, b_img)], 1)     # (B, S_txt + S_img, N)

which copies both projections once more (FLUX.1 at 1024²: 4608 x 3072 values a block). Each GEMM can write its
rows of the concatenation itself::

    v = new_empty(B, S_txt + S_img, N)
    linear_into(x_txt, w_txt, b_txt, v[:, :S_txt])
    linear_into(x_img, w_img, b_img, v[:, S_txt:])

The GEMM is torch's, as ``aten.linear`` runs it (``addmm`` with the bias over the flattened rows), with the
output given: where ``out`` is contiguous (batch 1) one GEMM; otherwise one a leading index, each writing its
contiguous (rows, N) block.
"""

from __future__ import annotations

import itertools

import torch

from ..errors import InvalidArgumentError
from .linear_accumulate import check_linear
from .registry import expect_dtype, expect_same_device, expect_shape, register_op


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    check_linear(x, weight, out)
    if bias is not None:
        expect_shape("bias", bias, (weight.shape[0],))
        expect_dtype("bias", bias, x.dtype)
    if out.numel() and not _rows_contiguous(out):
        raise InvalidArgumentError("out", "its last two dimensions must be contiguous (rows of out_features "
                                   f"values, one after the other), got strides {out.stride()}")
    expect_same_device({"x": x, "weight": weight, "bias": bias, "out": out})


def _rows_contiguous(out: torch.Tensor) -> bool:
    """Each (rows, N) block of ``out`` (its last two dimensions) is one contiguous run of memory."""
    return out[(0,) * (out.ndim - 2)].is_contiguous() if out.ndim > 2 else out.is_contiguous()


def _gemm(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out2: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)


def _linear_into_ref(x, weight, bias, out) -> None:
    out.copy_(torch.nn.functional.linear(x, weight, bias))


@register_op("linear_into", mutates_args=("out",), fake=_check, fallback=_linear_into_ref, runs=lambda device: True)
def _linear_into_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    _check(x, weight, bias, out)
    if out.numel() == 0:
        return
    n, k = weight.shape
    if out.is_contiguous():
        _gemm(x.reshape(-1, k), weight, bias, out.view(-1, n))
        return
    for at in itertools.product(*map(range, out.shape[:-2])):  # each leading index: a contiguous (rows, N) block
        _gemm(x[at], weight, bias, out[at])


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``torch.ops.diffc.linear_into``: ``out[...] = x @ weight^T + bias`` in place; returns ``out``."""
    torch.ops.diffc.linear_into(x, weight, bias, out)
    return out


__all__ = ["linear_into"]
