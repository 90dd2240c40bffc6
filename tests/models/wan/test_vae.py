"""Parity of the native Wan2.1 VAE with diffusers' AutoencoderKLWan on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan, AutoencoderKLWanConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")

TOL = REL_TOL[torch.float32]

# Production: wan2.1 (base_dim 96, dim_mult 1,2,4,4), 832x480 or 1280x720, 81 frames (21 latent frames).
CONFIGS = {
    # 2x spatial, 2x temporal, decoder narrower than encoder
    "two_stage": dict(
        base_dim=8, decoder_base_dim=10, z_dim=4, dim_mult=(1, 2), num_res_blocks=1,
        temperal_downsample=(True,), scale_factor_spatial=2, scale_factor_temporal=2,
    ),
    # 4x spatial, 2x temporal, two residual blocks per stage
    "three_stage": dict(
        base_dim=12, z_dim=6, dim_mult=(1, 2, 2), num_res_blocks=2,
        temperal_downsample=(False, True), scale_factor_spatial=4, scale_factor_temporal=2,
    ),
    # Wan2.1 layout (8x spatial, 4x temporal) at base_dim 8
    "wan21_like": dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # temporal downsampling in the first and last stages
    "t_first_last": dict(base_dim=16, z_dim=5, dim_mult=(1, 1, 2, 2), num_res_blocks=1,
                         temperal_downsample=(True, False, True)),
}  # fmt: skip
LATENT_FRAMES = (1, 2, 3)


def _pair(name: str):
    kwargs = dict(CONFIGS[name])
    kwargs.setdefault("latents_mean", [0.1 * i - 0.2 for i in range(kwargs["z_dim"])])
    kwargs.setdefault("latents_std", [1.0 + 0.25 * i for i in range(kwargs["z_dim"])])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}).eval()
    config = AutoencoderKLWanConfig.from_dict(dict(ref.config))
    model = AutoencoderKLWan(config).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model, config


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return _pair(request.param)


def _ratios(config: AutoencoderKLWanConfig) -> tuple[int, int]:
    spatial = 2 ** (len(config.dim_mult) - 1)
    temporal = 2 ** sum(config.temperal_downsample[: len(config.dim_mult) - 1])
    return spatial, temporal


@torch.no_grad()
@pytest.mark.parametrize("t_lat", LATENT_FRAMES)
def test_decode_matches_diffusers(pair, t_lat):
    ref, model, config = pair
    spatial, temporal = _ratios(config)
    z = torch.randn(2, config.z_dim, t_lat, 3, 5, generator=torch.Generator().manual_seed(t_lat))
    out = model.decode(z)
    expected = ref.decode(z).sample
    assert out.shape == (2, 3, 1 + temporal * (t_lat - 1), 3 * spatial, 5 * spatial)
    assert out.abs().max() <= 1.0 and (out.abs() < 1.0).float().mean() > 0.5
    assert rel_err(out, expected) < TOL


@torch.no_grad()
@pytest.mark.parametrize("frames", [1 + 4 * (t - 1) for t in LATENT_FRAMES])
def test_encode_matches_diffusers(pair, frames):
    ref, model, config = pair
    spatial, temporal = _ratios(config)
    x = torch.rand(1, 3, frames, 2 * spatial, 3 * spatial, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    mean, logvar = model.encode(x)
    dist = ref.encode(x).latent_dist
    t_lat = 1 + (frames - 1) // 4 * (4 // temporal)  # chunks of 1, then 4 frames
    assert mean.shape == logvar.shape == (1, config.z_dim, t_lat, 2, 3)
    assert rel_err(mean, dist.mean) < TOL
    assert rel_err(logvar, dist.logvar) < TOL


@torch.no_grad()
def test_wan21_shapes_and_tiled_decode_matches_diffusers():
    ref, model, config = _pair("wan21_like")
    z = torch.randn(1, config.z_dim, 2, 12, 16, generator=torch.Generator().manual_seed(7))
    tiles = dict(tile_sample_min_height=64, tile_sample_min_width=64,
                 tile_sample_stride_height=48, tile_sample_stride_width=48)  # fmt: skip
    ref.enable_tiling(**tiles)
    expected = ref.decode(z).sample
    out = model.decode(z, tiled=True, **tiles)
    assert out.shape == (1, 3, 5, 96, 128)
    assert rel_err(out, expected) < TOL
    untiled = model.decode(z)
    assert rel_err(out, untiled) > 1e-3  # the seams really were blended, not decoded whole
    # A frame that fits in one tile is decoded whole, as diffusers does.
    small = z[:, :, :, :8, :8]
    assert torch.equal(model.decode(small, tiled=True, **tiles), model.decode(small))


@torch.no_grad()
def test_chunked_decode_is_causal_and_stateless():
    _, model, config = _pair("wan21_like")
    z = torch.randn(1, config.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    full = model.decode(z)
    assert torch.equal(model.decode(z), full)
    assert torch.equal(model.decode(z[:, :, :2]), full[:, :, :5])
    assert not any(isinstance(v, (list, dict)) and v for k, v in vars(model).items() if not k.startswith("_"))


def test_state_dict_keys_match_diffusers(pair):
    ref, model, _ = pair
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_wan21_spec_builds_on_meta_with_diffusers_keys():
    assert WAN_VAE_SPECS["wan2.1"] == AutoencoderKLWanConfig.from_dict(diffusers.AutoencoderKLWan().config)
    with torch.device("meta"):
        model = AutoencoderKLWan(WAN_VAE_SPECS["wan2.1"])
        ref = diffusers.AutoencoderKLWan()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert AutoencoderKLWan._repeated_blocks == () and AutoencoderKLWan._keep_in_fp32_modules == ()


def test_denormalize_matches_pipeline_formula():
    model = AutoencoderKLWan(WAN_VAE_SPECS["tiny"])
    latents = torch.randn(1, 16, 2, 3, 4)
    mean = torch.tensor(model.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(model.denormalize(latents), latents / inv_std + mean)
    assert rel_err(model.normalize(model.denormalize(latents)), latents) < 1e-6


@pytest.mark.parametrize("override", [dict(is_residual=True), dict(patch_size=2)])
def test_wan22_variant_is_refused(override):
    config = dataclasses.replace(WAN_VAE_SPECS["tiny"], **override)
    with pytest.raises(CheckpointError, match="Wan2.2 VAE variant"):
        AutoencoderKLWan(config)


def test_bad_inputs_are_named():
    model = AutoencoderKLWan(AutoencoderKLWanConfig(**CONFIGS["wan21_like"], latents_mean=(0.0,) * 4,
                                                    latents_std=(1.0,) * 4))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="^z:"):
        model.decode(torch.randn(1, 5, 1, 2, 2))
    with pytest.raises(InvalidArgumentError, match="^x:.*1 \\+ 4k"):
        model.encode(torch.randn(1, 3, 4, 8, 8))
    with pytest.raises(InvalidArgumentError, match="^x:"):
        model.encode(torch.randn(3, 4, 8, 8))
    with pytest.raises(InvalidArgumentError, match="^tile_sample_min_width:"):
        model.decode(torch.randn(1, 4, 1, 2, 2), tiled=True, tile_sample_min_width=60)
    with pytest.raises(InvalidArgumentError, match="^tile_sample_stride_height:"):
        model.decode(torch.randn(1, 4, 1, 2, 2), tiled=True, tile_sample_stride_height=512)
    with pytest.raises(CheckpointError, match="latents_mean has 16 values"):
        AutoencoderKLWan(AutoencoderKLWanConfig(z_dim=4, base_dim=4, dim_mult=(1, 1))).denormalize(torch.zeros(1))
