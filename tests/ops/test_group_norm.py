"""diffc::group_norm (group norm + SiLU of a 2-D VAE's feature map, the producing convolution's bias folded in)
against its torch reference, ``F.group_norm`` then ``F.silu`` as the VAE's blocks run them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffc.ops.group_norm as gn
from diffc.errors import InvalidArgumentError
from diffc.ops.group_norm import group_norm, group_norm_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, norm_weight, randn


def _sliced(dtype):
    return randn(2, 24, 9, 14, dtype=dtype, seed=3, scale=2.0)[:, :, 1:8, 3:12]


# name -> (x of the given dtype, groups): channel counts off the 128-channel block, one group and one channel a
# group, pixel counts off the 64-pixel chunk, channels-last (the fused VAE's layout), sliced and permuted maps
INPUTS = {
    "c32-g8-cl": (lambda dt: randn(2, 32, 9, 13, dtype=dt, seed=1, scale=3.0, offset=1.0)
                  .contiguous(memory_format=torch.channels_last), 8),
    "c160-g32-cl": (lambda dt: randn(1, 160, 11, 12, dtype=dt, seed=2).contiguous(memory_format=torch.channels_last),
                    32),
    "c12-g1": (lambda dt: randn(1, 12, 5, 27, dtype=dt, seed=4), 1),
    "c6-g6": (lambda dt: randn(3, 6, 4, 4, dtype=dt, seed=5, scale=0.5), 6),
    "sliced-g4": (_sliced, 4),
    "permuted-g3": (lambda dt: randn(1, 7, 10, 9, dtype=dt, seed=6).permute(0, 3, 1, 2), 3),
    "one-pixel": (lambda dt: randn(2, 8, 1, 1, dtype=dt, seed=7), 2),
    # a video map (batch, channels, frames, height, width) and the (batch, channels, tokens) rows diffusers' VAE
    # attention normalises (a transposed view), and rows with no spatial dimension
    "video-g4": (lambda dt: randn(1, 16, 3, 5, 7, dtype=dt, seed=8, offset=0.5), 4),
    "token-rows-g2": (lambda dt: randn(2, 45, 12, dtype=dt, seed=9).transpose(1, 2), 2),
    "no-spatial-g3": (lambda dt: randn(5, 12, dtype=dt, seed=10), 3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "norm"])
def test_matches_group_norm_then_silu(counters, name, dtype, silu):
    make, groups = INPUTS[name]
    x = make(dtype)
    c = x.shape[1]
    weight, bias = norm_weight(c, dtype=dtype, seed=9), randn(c, dtype=dtype, seed=10, scale=0.5)
    out = torch.full_like(x, float("nan"))
    torch.ops.diffc.group_norm(x, weight, bias, None, groups, 1e-6, silu, out)
    assert_kernel_ran()
    assert_matches(out, group_norm_ref(x, weight, bias, groups, 1e-6, silu))
    # the VAE's modules: nn.GroupNorm, then nn.SiLU (on the CPU, with float32 statistics: a rounding apart in bf16)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6).to(dtype)
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    with torch.no_grad():
        expected = F.silu(norm(x)) if silu else norm(x)
    assert_matches(out, expected, **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_bias_is_added_first_and_rounded(counters, dtype):
    """``in_bias`` (the producing convolution's): ``x + in_bias`` rounded to x's dtype, as torch's add after cuDNN,
    in the statistics and in the normalised values."""
    x = randn(1, 40, 6, 70, dtype=dtype, seed=12, scale=2.0).contiguous(memory_format=torch.channels_last)
    weight, bias, in_bias = norm_weight(40, dtype=dtype, seed=13), randn(40, dtype=dtype, seed=14), \
        randn(40, dtype=dtype, seed=15, scale=3.0)
    out = group_norm(x, 8, weight, bias, 1e-6, silu=True, in_bias=in_bias)
    assert_kernel_ran()
    assert out.is_contiguous(memory_format=torch.channels_last)  # a new output keeps x's layout
    assert_matches(out, group_norm_ref(x + in_bias.view(1, -1, 1, 1), weight, bias, 8, 1e-6, True))


def test_rows_merged_over_many_chunks_and_programs(counters, monkeypatch):
    """Few programs (each merging many 64-pixel chunks) and many (one chunk each) give the same statistics."""
    x = randn(2, 16, 23, 29, seed=16, scale=2.0, offset=-1.0).contiguous(memory_format=torch.channels_last)
    expected = group_norm_ref(x, None, None, 4, 1e-6, False)
    for programs in (1, 3, 10_000):
        monkeypatch.setattr(gn, "PROGRAMS", programs)
        s, pix = gn.splits(2, 23 * 29, 1)
        assert s * pix >= 23 * 29 > (s - 1) * pix and pix % gn.BLOCK_P == 0
        assert_matches(group_norm(x, 4), expected)
    assert gn.splits(2, 23 * 29, 1) == (11, 64)


def test_statistics_do_not_cancel_on_a_large_mean(counters, monkeypatch):
    """Values far from zero with a small spread (the mean of squares minus the squared mean would lose the variance
    in float32: 9e4 - 9e4 for a variance of 0.01): the pairwise mean / squared-deviation merge keeps it."""
    monkeypatch.setattr(gn, "PROGRAMS", 2)
    x = randn(1, 8, 40, 40, seed=17, scale=0.1, offset=300.0).contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x.double(), 2, eps=1e-6).float()
    out = group_norm(x, 2, eps=1e-6)
    assert_kernel_ran()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_a_constant_map_normalises_to_the_bias(counters):
    x = torch.full((1, 8, 3, 5), 2.5)
    bias = randn(8, seed=18)
    out = group_norm(x, 4, torch.ones(8), bias, 1e-6, silu=False)
    assert_matches(out, group_norm_ref(x, torch.ones(8), bias, 4, 1e-6, False))
    # x * rstd + (bias - mean * rstd) with rstd = 1000 (eps alone) rounds at 2500, as torch's kernel does
    torch.testing.assert_close(out, bias.view(1, -1, 1, 1).expand_as(out), rtol=0, atol=1e-3)


def test_writes_into_a_destination_whose_pixels_do_not_merge(counters):
    """A sliced destination (its rows and columns not one stride apart) is written through a copy, nothing around it."""
    x = randn(1, 8, 5, 6, seed=22).contiguous(memory_format=torch.channels_last)
    buf = torch.full((1, 8, 7, 9), float("nan"))
    group_norm(x, 4, silu=True, out=buf[:, :, 1:6, 2:8])
    assert_kernel_ran()
    assert_matches(buf[:, :, 1:6, 2:8].contiguous(), group_norm_ref(x, None, None, 4, 1e-5, True))
    buf[:, :, 1:6, 2:8] = 0
    assert buf.isnan().sum() == buf.numel() - 8 * 5 * 6


def test_empty_map_writes_nothing(counters):
    x = torch.empty(0, 8, 3, 3)
    assert group_norm(x, 4).shape == (0, 8, 3, 3)


def test_opcheck(counters):
    x = randn(1, 8, 3, 5, seed=19).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.diffc.group_norm.default,
                          (x, norm_weight(8, torch.float32), randn(8, seed=20), randn(8, seed=21), 4, 1e-6, True,
                           torch.empty_like(x)))


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.group_norm
    x = randn(1, 4, 3, 3)
    good = torch.empty(1, 4, 3, 3)
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a \(batch, channels, ...\) map"):
        op(randn(4), None, None, None, 2, 1e-6, False, torch.empty(4))
    with pytest.raises(InvalidArgumentError, match=r"^groups: expected a positive integer dividing the 4 channels"):
        op(x, None, None, None, 3, 1e-6, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^groups: expected a positive integer"):
        op(x, None, None, None, 0, 1e-6, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected shape \(4,\)"):
        op(x, torch.ones(5), None, None, 2, 1e-6, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^bias: expected dtype torch.float32"):
        op(x, None, torch.ones(4, dtype=torch.bfloat16), None, 2, 1e-6, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^in_bias: expected shape \(4,\)"):
        op(x, None, None, torch.ones(2), 2, 1e-6, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^eps: expected a float >= 0"):
        op(x, None, None, None, 2, -1.0, False, good)
    with pytest.raises(InvalidArgumentError, match=r"^out: expected x's shape \(1, 4, 3, 3\)"):
        op(x, None, None, None, 2, 1e-6, False, torch.empty(1, 4, 3, 4))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected dtype torch.float32"):
        op(x, None, None, None, 2, 1e-6, False, good.bfloat16())
