"""Parity of the native Wan2.1 and Wan2.2 VAEs with diffusers' AutoencoderKLWan on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan, AutoencoderKLWanConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")

TOL = REL_TOL[torch.float32]

# Production: wan2.1 (base_dim 96, dim_mult 1,2,4,4), 832x480 or 1280x720, 81 frames (21 latent frames);
# wan2.2 (base_dim 160, decoder_base_dim 256, 2x2 patches, 16x spatial, 48 channels), 1280x704, 121 frames.
PATCHED = dict(patch_size=2, in_channels=12, out_channels=12)
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
    # Wan2.2 layout (residual stages, 2x2 patches, 16x spatial, 4x temporal), decoder wider than encoder
    "wan22_like": dict(PATCHED, is_residual=True, base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=(1, 2, 2, 2),
                       num_res_blocks=1, scale_factor_spatial=16),
    # Wan2.2 stages, 8x spatial, 2x temporal in the first stage, two residual blocks per stage
    "wan22_t_first": dict(PATCHED, is_residual=True, base_dim=6, decoder_base_dim=8, z_dim=5, dim_mult=(1, 2, 2),
                          num_res_blocks=2, temperal_downsample=(True, False), scale_factor_spatial=8,
                          scale_factor_temporal=2),
    # Wan2.2 stages without patches, 4x temporal in two stages (diffusers ignores attn_scales there)
    "wan22_unpatched": dict(is_residual=True, patch_size=1, base_dim=8, z_dim=4, dim_mult=(1, 1, 1),
                            num_res_blocks=1, attn_scales=(1.0,), temperal_downsample=(True, True),
                            scale_factor_spatial=4),
    # Wan2.1 stages with 2x2 patches
    "wan21_patched": dict(PATCHED, base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                          temperal_downsample=(False, True), scale_factor_spatial=8, scale_factor_temporal=2),
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
    spatial = (config.patch_size or 1) * 2 ** (len(config.dim_mult) - 1)
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


# 64-pixel tiles every 48 pixels over a 96x128 frame: 2 rows x 3 columns of tiles at 8x, 2 x 3 at 16x.
TILED = {"wan21_like": (12, 16, 6), "wan22_like": (6, 8, 6)}  # latent height, width, number of tiles


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(TILED))
def test_tiled_decode_and_progress_match_diffusers(name):
    ref, model, config = _pair(name)
    height, width, n_tiles = TILED[name]
    z = torch.randn(1, config.z_dim, 3, height, width, generator=torch.Generator().manual_seed(7))
    tiles = dict(tile_sample_min_height=64, tile_sample_min_width=64,
                 tile_sample_stride_height=48, tile_sample_stride_width=48)  # fmt: skip
    ref.enable_tiling(**tiles)
    expected = ref.decode(z).sample
    calls = []
    out = model.decode(z, tiled=True, progress=lambda done, total: calls.append((done, total)), **tiles)
    assert out.shape == (1, 3, 9, 96, 128)
    assert rel_err(out, expected) < TOL
    assert calls == [(k, 3 * n_tiles) for k in range(1, 3 * n_tiles + 1)]  # every latent frame of every tile
    calls.clear()
    untiled = model.decode(z, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert rel_err(out, untiled) > 1e-3  # the seams really were blended, not decoded whole
    # A frame that fits in one tile is decoded whole, as diffusers does.
    ratio = config.scale_factor_spatial
    small = z[:, :, :, : 64 // ratio, : 64 // ratio]
    assert torch.equal(model.decode(small, tiled=True, **tiles), model.decode(small))


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan21_like", "wan22_like"])
def test_chunked_decode_is_causal_and_stateless(name):
    _, model, config = _pair(name)
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


# The published vae/config.json as diffusers keywords: Wan2.1's are diffusers' defaults; Wan2.2's from
# Wan-AI/Wan2.2-TI2V-5B-Diffusers (its 48 latent statistics are checked by length and end values only).
PUBLISHED = {
    "wan2.1": {},
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_specs_build_on_meta_with_diffusers_keys(name):
    spec = WAN_VAE_SPECS[name]
    kwargs = dict(PUBLISHED[name])
    if name == "wan2.2":
        assert (spec.latents_mean[0], spec.latents_mean[-1], spec.latents_std[0], spec.latents_std[-1]) == (
            -0.2289, -0.0667, 0.4765, 0.7744)  # fmt: skip
        kwargs.update(latents_mean=list(spec.latents_mean), latents_std=list(spec.latents_std))
    with torch.device("meta"):
        model = AutoencoderKLWan(spec)
        ref = diffusers.AutoencoderKLWan(**kwargs)
    assert spec == AutoencoderKLWanConfig.from_dict(dict(ref.config))
    assert len(model.latents_mean) == len(model.latents_std) == spec.z_dim
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert AutoencoderKLWan._repeated_blocks == () and AutoencoderKLWan._keep_in_fp32_modules == ()


@pytest.mark.parametrize("name", ["tiny", "wan2.2"])
def test_denormalize_matches_pipeline_formula(name):
    with torch.device("meta"):
        model = AutoencoderKLWan(WAN_VAE_SPECS[name])
    z_dim = model.config.z_dim
    latents = torch.randn(1, z_dim, 2, 3, 4)
    mean = torch.tensor(model.latents_mean).view(1, z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.latents_std).view(1, z_dim, 1, 1, 1)
    assert torch.equal(model.denormalize(latents), latents / inv_std + mean)
    assert rel_err(model.normalize(model.denormalize(latents)), latents) < 1e-6


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


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan21_like", "wan22_like"])
def test_fused_kernels_match_diffusers(name):
    """``set_fused_kernels(True)`` (what a compiled pipeline does on a GPU): every norm + SiLU before a cached conv
    runs the fused op, writing the padded conv input, over several chunks (the cache keeps padded frames)."""
    from diffc.ops.registry import COUNTERS, kernel_runs_on

    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    ref, model, config = _pair(name)
    z = torch.randn(1, config.z_dim, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    spatial, _ = _ratios(config)
    x = torch.rand(1, 3, 5, 2 * spatial, 2 * spatial, generator=torch.Generator().manual_seed(6)) * 2 - 1
    unfused = model.decode(z)
    model.set_fused_kernels(True)
    COUNTERS.reset()
    out = model.decode(z)
    resblocks = sum(type(m).__name__ == "ResidualBlock" for m in model.decoder.modules())
    # three chunks: two norms a residual block and norm_out, and each block's residual add where its two branches
    # share a memory layout (on the CPU some convolutions return channels-first maps)
    assert 3 * (2 * resblocks + 1) < COUNTERS.kernel_launches <= 3 * (3 * resblocks + 1)
    assert rel_err(out, ref.decode(z).sample) < TOL
    assert rel_err(out, unfused) < 1e-5
    mean, _ = model.encode(x)
    assert rel_err(mean, ref.encode(x).latent_dist.mean) < TOL
    model.set_fused_kernels(False)
    COUNTERS.reset()
    assert torch.equal(model.decode(z), unfused) and COUNTERS.kernel_launches == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96, 6, 10), (3, 5, 7, 9), (2, 4, 1, 3)], ids=["wan-like", "odd", "one-row"])
def test_channels_last_upsample_copies_nearest_exact(shape, dtype):
    """The fused path's channels-last 2x upsampling (one copy of a broadcast view) gives nearest-exact's values
    and keeps the channels-last layout the next convolution reads; channels-first maps take torch's kernel."""
    import torch.nn.functional as F

    from diffc.models.wan.vae_blocks import NearestUpsample2x

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layout in (torch.channels_last, torch.contiguous_format):
        inp = x.contiguous(memory_format=layout)
        out = NearestUpsample2x()(inp)
        assert torch.equal(out, F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact"))
        assert out.is_contiguous(memory_format=layout)
