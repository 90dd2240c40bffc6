"""diffc::gelu_tanh (bias add + tanh GELU) against the feed-forward epilogue of FLUX and Wan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffc.models.flux.blocks as flux_blocks
import diffc.models.wan.blocks as wan_blocks
from diffc.errors import InvalidArgumentError
from diffc.ops.gelu_tanh import gelu_tanh_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned, randn, tolerance

# (..., hidden). Production: FLUX.1 ff hidden 12,288 over 4096 image / 512 text tokens, single-stream
# proj_mlp 12,288 over 4608; Wan2.1 ffn 8960 (1.3B) or 13,824 (14B) over 32,760 tokens.
SHAPES = {
    "r7n33": (7, 33),
    "b2s3n40": (2, 3, 40),
    "r1n1500": (1, 1500),  # more than one 1024-element block
}


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(counters, shape, dtype, with_bias):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0)
    bias = randn(shape[-1], dtype=dtype, seed=2) if with_bias else None
    out = poisoned(*shape, dtype=dtype)
    torch.ops.diffc.gelu_tanh(x, bias, out)
    assert_kernel_ran()
    assert_matches(out, gelu_tanh_ref(x, bias))


def test_opcheck(counters):
    x, bias = randn(3, 5, 33, seed=1), randn(33, seed=2)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.diffc.gelu_tanh.default, (x, b, torch.empty_like(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_the_models_feed_forward_projection(dtype):
    """``gelu(linear(x))`` of FLUX's ``ff.net.0`` and Wan's ``ffn.net.0`` with the bias split off the GEMM.

    Not bit for bit: ``addmm`` adds the bias before rounding the GEMM, the split form after.
    """
    torch.manual_seed(0)
    x = randn(2, 5, 24, dtype=dtype, seed=1)
    for proj in (flux_blocks.GELUProj(24, 37), wan_blocks.GELUProjection(24, 37)):
        proj = proj.to(dtype)
        with torch.no_grad():
            ref = gelu_tanh_ref(F.linear(x, proj.proj.weight), proj.proj.bias)
            torch.testing.assert_close(proj(x), ref, **tolerance(dtype))


def test_bad_arguments_name_the_field():
    x = randn(4, 6)
    op = torch.ops.diffc.gelu_tanh
    with pytest.raises(InvalidArgumentError, match=r"^bias: expected shape \(6,\)"):
        op(x, randn(5), torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected dtype"):
        op(x, None, torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a contiguous tensor"):
        op(x.t(), None, torch.empty(6, 4))
