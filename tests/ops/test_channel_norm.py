"""diffc::channel_rms_norm_silu (the Wan VAE's channel RMS norm + SiLU, written into a zero-bordered conv input)
against its torch reference, the VAE's own eager math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.errors import InvalidArgumentError
from diffc.models.wan.vae_blocks import RMSNorm
from diffc.ops.channel_norm import channel_bias_residual_ref, channel_rms_norm_silu, channel_rms_norm_silu_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, norm_weight, poisoned, randn


def _permuted(b, c, t, h, w, dtype, seed):
    """(b, c, t, h, w) as the VAE's resampler returns it: a view of a (b, t, c, h, w) tensor."""
    return randn(b, t, c, h, w, dtype=dtype, seed=seed, scale=2.0).permute(0, 2, 1, 3, 4)


# name -> (x of the given dtype, pad_h, pad_w): channel counts off the 32-channel step, widths past one
# 64-column block, strided inputs
INPUTS = {
    "c40-pad1": (lambda dt: randn(2, 40, 3, 5, 70, dtype=dt, seed=1, scale=3.0), 1, 1),
    "c96-pad1-one-frame": (lambda dt: randn(1, 96, 1, 4, 9, dtype=dt, seed=2), 1, 1),
    "c7-no-pad": (lambda dt: randn(1, 7, 2, 3, 130, dtype=dt, seed=3), 0, 0),
    "permuted-pad-w2": (lambda dt: _permuted(1, 33, 2, 6, 20, dt, 4), 0, 2),
    "sliced": (lambda dt: randn(2, 16, 4, 8, 12, dtype=dt, seed=5)[:, :, 1:3, 2:7, 3:11], 1, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", INPUTS)
def test_matches_vae_math_with_zero_border(counters, name, dtype):
    make, pad_h, pad_w = INPUTS[name]
    x = make(dtype)
    b, c, t, h, w = x.shape
    gamma = norm_weight(c, dtype=dtype, seed=9)
    out = poisoned(b, c, t, h + 2 * pad_h, w + 2 * pad_w, dtype=dtype)
    torch.ops.diffc.channel_rms_norm_silu(x, gamma, None, c**0.5, 1e-12, pad_h, pad_w, out)
    assert_kernel_ran()
    assert_matches(out, F.pad(channel_rms_norm_silu_ref(x, gamma, c**0.5, 1e-12), (pad_w, pad_w, pad_h, pad_h)))
    # the reference is the VAE's module: F.normalize in float32, * sqrt(C) * gamma, then SiLU
    norm = RMSNorm(c, images=False).to(dtype)
    norm.gamma.data.copy_(gamma.view(c, 1, 1, 1))
    interior = out[:, :, :, pad_h : pad_h + h, pad_w : pad_w + w]
    assert_matches(interior.contiguous(), F.silu(norm(x)))
    if pad_h or pad_w:
        border = out.clone()
        border[:, :, :, pad_h : pad_h + h, pad_w : pad_w + w] = 0
        assert torch.equal(border, torch.zeros_like(border))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_is_added_first_and_rounded(counters, dtype):
    """``bias`` (the producing convolution's): ``x + bias`` rounded to x's dtype, as torch's add after cuDNN."""
    x = randn(1, 40, 2, 4, 70, dtype=dtype, seed=12, scale=2.0).contiguous(memory_format=torch.channels_last_3d)
    gamma, bias = norm_weight(40, dtype=dtype, seed=13), randn(40, dtype=dtype, seed=14)
    out = channel_rms_norm_silu(x, gamma, 40**0.5, pad_h=1, pad_w=1, bias=bias)
    assert_kernel_ran()
    biased = x + bias.view(1, -1, 1, 1, 1)
    assert_matches(out, F.pad(channel_rms_norm_silu_ref(biased, gamma, 40**0.5, 1e-12), (1, 1, 1, 1)))
    assert_matches(out, F.pad(channel_rms_norm_silu_ref(x, gamma, 40**0.5, 1e-12, bias), (1, 1, 1, 1)))


def test_writes_into_a_strided_destination(counters):
    """The destination may be a slice of a larger buffer (the VAE's padded conv input after cached frames)."""
    x = randn(1, 24, 2, 5, 6, seed=11)
    gamma = norm_weight(24, torch.float32)
    buf = poisoned(1, 24, 4, 7, 8, dtype=torch.float32)
    channel_rms_norm_silu(x, gamma, 24**0.5, pad_h=1, pad_w=1, out=buf[:, :, 2:])
    assert_kernel_ran()
    assert buf[:, :, :2].isnan().all()  # the frames in front are the caller's
    assert_matches(buf[:, :, 2:].contiguous(), F.pad(channel_rms_norm_silu_ref(x, gamma, 24**0.5, 1e-12), (1, 1, 1, 1)))


def test_all_zero_positions_stay_zero(counters):
    x = torch.zeros(1, 8, 1, 2, 3)
    out = channel_rms_norm_silu(x, torch.ones(8), 8**0.5, pad_h=1, pad_w=1)
    assert torch.equal(out, torch.zeros_like(out))


def test_opcheck(counters):
    x = randn(1, 6, 2, 3, 4, seed=1)
    torch.library.opcheck(torch.ops.diffc.channel_rms_norm_silu.default,
                          (x, norm_weight(6, torch.float32), randn(6, seed=2), 6**0.5, 1e-12, 1, 1, torch.empty(1, 6, 2, 5, 6)))


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.channel_rms_norm_silu
    x = randn(1, 4, 2, 3, 3)
    good = torch.empty(1, 4, 2, 5, 5)
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a \(batch, channels, frames, height, width\) map"):
        op(randn(4, 3, 3), torch.ones(4), None, 2.0, 1e-12, 1, 1, good)
    with pytest.raises(InvalidArgumentError, match=r"^gamma: expected shape \(4,\)"):
        op(x, torch.ones(5), None, 2.0, 1e-12, 1, 1, good)
    with pytest.raises(InvalidArgumentError, match=r"^gamma: expected dtype torch.float32"):
        op(x, torch.ones(4, dtype=torch.bfloat16), None, 2.0, 1e-12, 1, 1, good)
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(1, 4, 2, 5, 5\)"):
        op(x, torch.ones(4), None, 2.0, 1e-12, 1, 1, torch.empty(1, 4, 2, 3, 3))
    with pytest.raises(InvalidArgumentError, match=r"^pad_w: expected an integer >= 0"):
        op(x, torch.ones(4), None, 2.0, 1e-12, 1, -1, good)
    with pytest.raises(InvalidArgumentError, match=r"^eps: expected a float >= 0"):
        op(x, torch.ones(4), None, 2.0, -1.0, 1, 1, good)
    with pytest.raises(InvalidArgumentError, match=r"^out: expected dtype torch.float32"):
        op(x, torch.ones(4), None, 2.0, 1e-12, 1, 1, good.bfloat16())
    with pytest.raises(InvalidArgumentError, match=r"^bias: expected shape \(4,\)"):
        op(x, torch.ones(4), torch.ones(2), 2.0, 1e-12, 1, 1, good)


# ---- diffc::channel_bias_residual ----------------------------------------------------------------------------

def _layouts(dtype):
    x = randn(2, 12, 3, 5, 7, dtype=dtype, seed=21)
    return {
        "channels-first": x,
        "channels-last": x.contiguous(memory_format=torch.channels_last_3d),
        "2d-channels-last": randn(3, 10, 6, 9, dtype=dtype, seed=22).contiguous(memory_format=torch.channels_last),
        "one-frame": x[:, :, :1].contiguous(memory_format=torch.channels_last_3d),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels-first", "channels-last", "2d-channels-last", "one-frame"])
def test_bias_residual_matches_two_adds(counters, layout, dtype):
    x = _layouts(dtype)[layout]
    bias = randn(x.shape[1], dtype=dtype, seed=23)
    residual = torch.empty_like(x).copy_(randn(*x.shape, dtype=dtype, seed=24))
    out = torch.empty_like(x).fill_(float("nan"))
    torch.ops.diffc.channel_bias_residual(x, bias, residual, out)
    assert_kernel_ran()
    expected = channel_bias_residual_ref(x, bias, residual)
    assert_matches(out, expected)
    assert torch.equal(out, expected)  # both roundings where torch's two adds make them


def test_bias_residual_opcheck(counters):
    x = randn(1, 6, 2, 3, 4, seed=31).contiguous(memory_format=torch.channels_last_3d)
    residual = torch.empty_like(x).copy_(randn(1, 6, 2, 3, 4, seed=32))
    torch.library.opcheck(torch.ops.diffc.channel_bias_residual.default,
                          (x, randn(6, seed=33), residual, torch.empty_like(x)))


def test_bias_residual_checks_layouts():
    op = torch.ops.diffc.channel_bias_residual
    x = randn(1, 4, 2, 3, 3)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(InvalidArgumentError, match=r"^residual: expected x's memory layout"):
        op(x, torch.ones(4), cl, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a dense tensor"):
        sliced = randn(1, 4, 2, 3, 6)[..., ::2]
        op(sliced, torch.ones(4), sliced, torch.empty(1, 4, 2, 3, 6)[..., ::2])
    with pytest.raises(InvalidArgumentError, match=r"^bias: expected shape \(4,\)"):
        op(x, torch.ones(3), x, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected x's shape"):
        op(x, torch.ones(4), x, torch.empty(1, 4, 2, 3, 4))
