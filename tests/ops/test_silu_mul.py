"""diffc::silu_mul (SwiGLU gate over a concatenated ``[a | b]`` last dimension) against its reference.

No FLUX.1 or Wan2.1 layer uses SwiGLU, so there is no model computation to compare the reference
with; it is checked against the definition ``silu(a) * b``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.errors import InvalidArgumentError
from diffc.ops.silu_mul import silu_mul_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned, randn

# (..., 2 * hidden). Production SwiGLU DiTs gate e.g. 2 x 12,288 channels over ~4096-32,760 tokens.
SHAPES = {
    "r7n17": (7, 34),
    "b2s3n40": (2, 3, 80),
    "r1n1100": (1, 2200),  # more than one 1024-element block
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(counters, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0)
    out = poisoned(*shape[:-1], shape[-1] // 2, dtype=dtype)
    torch.ops.diffc.silu_mul(x, out)
    assert_kernel_ran()
    assert_matches(out, silu_mul_ref(x))


def test_opcheck(counters):
    x = randn(3, 5, 34)
    torch.library.opcheck(torch.ops.diffc.silu_mul.default, (x, torch.empty(3, 5, 17)))


def test_reference_gates_the_first_half_with_the_second():
    a, b = randn(4, 9, seed=1), randn(4, 9, seed=2)
    torch.testing.assert_close(silu_mul_ref(torch.cat([a, b], dim=-1)), F.silu(a) * b, rtol=0, atol=0)


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.silu_mul
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a contiguous \(..., 2N\) tensor"):
        op(randn(4, 7), torch.empty(4, 3))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(4, 4\)"):
        op(randn(4, 8), torch.empty(4, 8))
