"""What the Wan2.2 VAE adds to the Wan2.1 one: pixel patches, residual-stage configs and input sizes.

Its encode/decode parity with diffusers runs with the Wan2.1 checks in ``test_vae.py`` (the ``wan22_*`` configs).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan, AutoencoderKLWanConfig
from diffc.models.wan.vae_blocks import patchify, unpatchify

wan_vae = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")

TINY = WAN_VAE_SPECS["tiny"]


@pytest.mark.parametrize("patch_size", (1, 2, 3))
def test_patchify_matches_diffusers(patch_size):
    x = torch.randn(2, 3, 2, 6 * patch_size, 4 * patch_size)
    patched = patchify(x, patch_size)
    assert torch.equal(patched, wan_vae.patchify(x, patch_size))
    assert torch.equal(unpatchify(patched, patch_size), x)
    assert torch.equal(unpatchify(patched, patch_size), wan_vae.unpatchify(patched, patch_size))
    assert unpatchify(patched, patch_size).is_contiguous()


def test_wan22_variant_is_accepted():
    assert AutoencoderKLWan(dataclasses.replace(TINY, is_residual=True)).decoder.up_blocks[0].upsampler is not None
    patched = dataclasses.replace(TINY, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    assert AutoencoderKLWan(patched).video_channels == 3


BAD_CONFIGS = {
    "patch_size must be null or a positive integer, got 0": dict(patch_size=0),
    "in_channels=3 counts the channels of 2x2 pixel patches": dict(patch_size=2),
    "out_channels=3 counts the channels of 2x2 pixel patches": dict(patch_size=2, in_channels=12),
    "scale_factor_spatial=9 must be a multiple of patch_size=2": dict(
        patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=9),
    # the last stage's shortcut would have to average 8 channels into 16
    "dim_mult=\\[1, 2\\] .*residual \\(Wan2.2\\) stages: the down-block shortcut averages 8 channels":
        dict(is_residual=True, dim_mult=(1, 2), temperal_downsample=(True,)),
}  # fmt: skip


@pytest.mark.parametrize("message", sorted(BAD_CONFIGS))
def test_bad_configs_are_named(message):
    with pytest.raises(CheckpointError, match=message):
        AutoencoderKLWan(dataclasses.replace(TINY, **BAD_CONFIGS[message]))


def test_bad_inputs_are_named():
    config = AutoencoderKLWanConfig(
        base_dim=4, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4,
    )  # fmt: skip
    model = AutoencoderKLWan(config)
    with pytest.raises(InvalidArgumentError, match="^x:.*multiples of 16 for this VAE, got 24x32"):
        model.encode(torch.randn(1, 3, 1, 24, 32))
    with pytest.raises(InvalidArgumentError, match="^x:.*\\(batch, 3, frames, height, width\\)"):
        model.encode(torch.randn(1, 12, 1, 16, 16))
    with pytest.raises(InvalidArgumentError, match="^x:.*1 \\+ 4k"):
        model.encode(torch.randn(1, 3, 3, 16, 16))
    with pytest.raises(InvalidArgumentError, match="^z:"):
        model.decode(torch.randn(1, 5, 1, 2, 2))
    with pytest.raises(InvalidArgumentError, match="^tile_sample_min_width:.*multiple of 16"):
        model.decode(torch.randn(1, 4, 1, 2, 2), tiled=True, tile_sample_min_width=72)
