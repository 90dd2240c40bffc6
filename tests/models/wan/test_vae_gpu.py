"""The Wan VAE's fused norm + SiLU kernel on a GPU: the op against its torch reference at the real decoder's widths
and strides, and a bf16 decode with the fused kernels against the eager one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.models.wan.vae import AutoencoderKLWan, AutoencoderKLWanConfig
from diffc.ops.channel_norm import channel_rms_norm_silu, channel_rms_norm_silu_ref
from diffc.ops.registry import COUNTERS
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# (shape of x, strided as the resampler returns it) at the Wan2.1 decoder's widths, 832x480 video
SHAPES = [((1, 384, 1, 60, 104), False), ((1, 384, 2, 120, 208), True), ((1, 192, 4, 240, 416), False),
          ((1, 96, 4, 120, 200), False), ((2, 40, 3, 17, 70), True)]


@pytest.mark.parametrize("shape,permuted", SHAPES)
def test_kernel_matches_reference_on_gpu(shape, permuted):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, c, t, h, w = shape
    if permuted:
        x = torch.randn(b, t, c, h, w, device="cuda", generator=g).mul(3).bfloat16().permute(0, 2, 1, 3, 4)
    else:
        x = torch.randn(shape, device="cuda", generator=g).mul(3).bfloat16()
    gamma = (1 + 0.3 * torch.randn(c, device="cuda", generator=g)).bfloat16()
    out = channel_rms_norm_silu(x, gamma, c**0.5, pad_h=1, pad_w=1)
    ref = F.pad(channel_rms_norm_silu_ref(x, gamma, c**0.5, 1e-12), (1, 1, 1, 1))
    # float32 sums in another order can flip the first of the four bf16 roundings, and the flip carry to the last
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=1e-2)
    assert (out == ref).float().mean() > 0.9999


@torch.no_grad()
def test_fused_decode_is_as_close_to_float32_as_eager_bf16():
    """bf16 decodes drift from the float32 one by rounding; the fused kernels (other sums, channels-last cuDNN
    algorithms) may round differently, not worse. Eager bf16 is unchanged after switching them off."""
    torch.manual_seed(0)
    config = AutoencoderKLWanConfig(base_dim=32, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    vae = AutoencoderKLWan(config).eval().to("cuda")
    z = torch.randn(1, 16, 4, 12, 20, device="cuda")
    exact = vae.decode(z)
    vae.to(torch.bfloat16)
    zb = z.bfloat16()
    eager = vae.decode(zb)
    vae.set_fused_kernels(True)
    COUNTERS.reset()
    fused = vae.decode(zb)
    resblocks = sum(type(m).__name__ == "ResidualBlock" for m in vae.decoder.modules())
    # per latent frame: two norms a residual block and norm_out, and the blocks' residual adds where both branches
    # are channels-last (not behind the first conv, which reads the channels-first latents)
    assert 4 * (2 * resblocks + 1) + 4 * (resblocks - 2) <= COUNTERS.kernel_launches <= 4 * (3 * resblocks + 1)
    assert fused.shape == eager.shape == (1, 3, 13, 96, 160) and fused.is_contiguous()
    eager_err, fused_err = rel_err(eager.float(), exact), rel_err(fused.float(), exact)
    assert fused_err < 1.5 * eager_err + 1e-3, (fused_err, eager_err)
    vae.set_fused_kernels(False)
    assert torch.equal(vae.decode(zb), eager)
