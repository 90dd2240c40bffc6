"""diffc::rms_norm (RMSNorm over the last dimension of a strided view, written contiguous) against
``aten.rms_norm`` and its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.errors import InvalidArgumentError
from diffc.ops.rms_norm import rms_norm_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, norm_weight, poisoned, randn


def _head_view(b, s, h, d, dtype, seed):
    """(B, H, S, D) as the attention sees it: a transposed view of the projection's (B, S, H*D) output."""
    return randn(b, s, h * d, dtype=dtype, seed=seed, scale=3.0).view(b, s, h, d).transpose(1, 2)


# name -> a function (dtype) returning x; heads views as SD3 / HunyuanVideo, contiguous rows, odd widths
INPUTS = {
    "heads-view-d64": lambda dt: _head_view(2, 37, 3, 64, dt, 1),
    "heads-view-d128": lambda dt: _head_view(1, 20, 5, 128, dt, 2),
    "rows-3d": lambda dt: randn(2, 9, 96, dtype=dt, seed=3),
    "rows-2d-odd": lambda dt: randn(11, 72, dtype=dt, seed=4),
    "wide-1d": lambda dt: randn(3000, dtype=dt, seed=5),
    "sliced": lambda dt: randn(4, 10, 80, dtype=dt, seed=6)[:, 2:9, :48],
}


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", INPUTS)
def test_matches_aten_rms_norm(counters, name, dtype, with_weight):
    x = INPUTS[name](dtype)
    weight = norm_weight(x.shape[-1], dtype=dtype, seed=9) if with_weight else None
    out = poisoned(*x.shape, dtype=dtype)
    torch.ops.diffc.rms_norm(x, weight, 1e-6, out)
    assert_kernel_ran()
    assert out.is_contiguous()
    assert_matches(out, rms_norm_ref(x, weight, 1e-6))
    assert_matches(out, F.rms_norm(x, x.shape[-1:], weight, 1e-6))


def test_opcheck(counters):
    x = _head_view(1, 6, 2, 16, torch.float32, 0)
    torch.library.opcheck(torch.ops.diffc.rms_norm.default, (x, norm_weight(16, torch.float32, seed=1), 1e-5, torch.empty(x.shape)))


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.rms_norm
    x = randn(4, 8)
    with pytest.raises(InvalidArgumentError, match=r"^x: the last dimension must be contiguous"):
        op(randn(8, 4).t(), None, 1e-6, torch.empty(4, 8))
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected shape \(8,\)"):
        op(x, torch.ones(4), 1e-6, torch.empty(4, 8))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(4, 8\)"):
        op(x, None, 1e-6, torch.empty(4, 9))
    with pytest.raises(InvalidArgumentError, match=r"^x: expected 1 to 4 dimensions"):
        op(randn(1, 2, 2, 2, 4), None, 1e-6, torch.empty(1, 2, 2, 2, 4))
