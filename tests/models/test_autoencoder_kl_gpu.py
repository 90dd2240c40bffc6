"""The 2-D VAE's fused group norm on a GPU: the op against its torch reference at the FLUX.1 decoder's widths and
sizes (rows split over many programs), and a bf16 decode and encode with the fused kernels against eager ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from diffc.models.autoencoder_kl import AUTOENCODER_KL_SPECS, AutoencoderKL
from diffc.ops.group_norm import group_norm, group_norm_ref
from diffc.ops.registry import COUNTERS
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# (shape, groups, channels-last) at the FLUX.1 decoder's widths, 1024² image; and odd ones
SHAPES = [((1, 512, 128, 128), 32, True), ((1, 512, 256, 256), 32, True), ((1, 256, 512, 512), 32, True),
          ((1, 128, 1024, 1024), 32, True), ((2, 96, 33, 47), 8, True), ((1, 64, 40, 24), 4, False),
          ((1, 32, 2048, 2100), 8, True)]  # more 64-pixel tiles than a grid's second dimension takes (65535)


@pytest.mark.parametrize("shape,groups,channels_last", SHAPES)
@pytest.mark.parametrize("with_in_bias", [False, True], ids=["plain", "in_bias"])
def test_kernel_matches_reference_on_gpu(shape, groups, channels_last, with_in_bias):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, device="cuda", generator=g).mul(3).add(0.5).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.3 * torch.randn(c, device="cuda", generator=g)).bfloat16()
    bias = (0.2 * torch.randn(c, device="cuda", generator=g)).bfloat16()
    in_bias = torch.randn(c, device="cuda", generator=g).bfloat16() if with_in_bias else None
    out = group_norm(x, groups, weight, bias, 1e-6, silu=True, in_bias=in_bias)
    ref = group_norm_ref(x, weight, bias, groups, 1e-6, True, in_bias)
    biased = x if in_bias is None else x + in_bias.view(1, -1, 1, 1)
    eager = F.silu(F.group_norm(biased, groups, weight, bias, 1e-6))  # torch's CUDA kernels, which ref emulates
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # float32 sums in another order can flip the norm's bf16 rounding, and the flip carry through the SiLU
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-2)
    assert (out == ref).float().mean() > 0.99 and (out == eager).float().mean() > 0.99
    stats = group_norm_ref(x.double(), None, None, groups, 1e-6, False, None if in_bias is None else in_bias.double())
    plain = group_norm(x, groups, eps=1e-6, in_bias=in_bias)  # normalised values alone: against float64
    torch.testing.assert_close(plain.double(), stats, rtol=2e-2, atol=2e-2)


@torch.no_grad()
def test_fused_decode_and_encode_are_as_close_to_float32_as_eager_bf16():
    """bf16 decodes drift from the float32 one by rounding; the fused kernels (other sums, channels-last cuDNN
    algorithms) may round differently, not worse. Eager bf16 is unchanged after switching them off."""
    torch.manual_seed(0)
    flux = AUTOENCODER_KL_SPECS["flux"]
    config = dataclasses.replace(flux, block_out_channels=(32, 64, 128, 128))
    vae = AutoencoderKL(config).eval().to("cuda")
    for name, p in vae.named_parameters():
        if "norm" in name:
            p.data.add_(0.1 * torch.randn_like(p))
    z = torch.randn(1, 16, 24, 40, device="cuda")
    image = torch.rand(1, 3, 96, 160, device="cuda") * 2 - 1
    exact, (exact_mean, _) = vae.decode(z), vae.encode(image)
    vae.to(torch.bfloat16)
    zb, imageb = z.bfloat16(), image.bfloat16()
    eager, (eager_mean, _) = vae.decode(zb), vae.encode(imageb)
    vae.set_fused_kernels(True)
    COUNTERS.reset()
    fused = vae.decode(zb)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in vae.decoder.modules())
    assert COUNTERS.kernel_launches == norms + resnets
    assert fused.shape == eager.shape == (1, 3, 192, 320) and fused.is_contiguous()
    eager_err, fused_err = rel_err(eager.float(), exact), rel_err(fused.float(), exact)
    assert fused_err < 1.5 * eager_err + 1e-3, (fused_err, eager_err)
    fused_mean, _ = vae.encode(imageb)
    eager_err, fused_err = rel_err(eager_mean.float(), exact_mean), rel_err(fused_mean.float(), exact_mean)
    assert fused_err < 1.5 * eager_err + 1e-3, (fused_err, eager_err)
    vae.set_fused_kernels(False)
    assert torch.equal(vae.decode(zb), eager)


@torch.no_grad()
def test_flux_decode_at_1024_is_as_close_to_float32_as_eager_bf16():
    """FLUX.1's VAE at its real size (random weights): the fused bf16 decode no further from the float32 one than
    the eager bf16 decode."""
    torch.manual_seed(0)
    vae = AutoencoderKL(AUTOENCODER_KL_SPECS["flux"]).eval().to("cuda")
    z = torch.randn(1, 16, 128, 128, device="cuda")
    exact = vae.decode(z)
    vae.to(torch.bfloat16)
    eager = vae.decode(z.bfloat16())
    vae.set_fused_kernels(True)
    fused = vae.decode(z.bfloat16())
    eager_err, fused_err = rel_err(eager.float(), exact), rel_err(fused.float(), exact)
    assert fused_err < 1.5 * eager_err + 1e-3, (fused_err, eager_err)
