"""Parity of the native AutoencoderKL with diffusers' AutoencoderKL (the oracle) on tiny random configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.autoencoder_kl import AUTOENCODER_KL_SPECS, AutoencoderKL, AutoencoderKLConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")


def _config(block_out_channels, **kwargs) -> AutoencoderKLConfig:
    n = len(block_out_channels)
    return AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        **kwargs,
    )


# name -> (config, image (H, W) for encode, latent (h, w) for decode).
# Production: FLUX.1 at 1024x1024 is image (1024, 1024), latent (128, 128), 4 blocks.
CASES = {
    "one_block_quant_attn": (
        _config((16,), layers_per_block=1, latent_channels=4, norm_num_groups=4),
        (5, 7), (5, 7),
    ),
    "two_blocks_no_quant_no_attn": (
        _config((8, 16), layers_per_block=2, latent_channels=3, norm_num_groups=2, out_channels=2,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
        (10, 14), (4, 6),
    ),
    "three_blocks_mixed_quant": (
        _config((8, 16, 24), layers_per_block=1, latent_channels=5, norm_num_groups=8, act_fn="swish",
                use_quant_conv=True, use_post_quant_conv=False),
        (16, 24), (5, 7),
    ),
    "tiny_spec": (AUTOENCODER_KL_SPECS["tiny"], (12, 18), (4, 6)),
}


def _pair(config: AutoencoderKLConfig, seed: int = 0):
    """A diffusers AutoencoderKL with random weights (norms included) and the native copy of it."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**config.to_dict()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # GroupNorm affine starts at ones/zeros; perturb it too.
                p.add_(0.1 * torch.randn_like(p))
    native = AutoencoderKL(config).eval()
    native.load_state_dict(ref.state_dict(), strict=True)
    return ref, native


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_match_diffusers(case):
    config = CASES[case][0]
    ref = diffusers.AutoencoderKL(**config.to_dict())
    native = AutoencoderKL(config)
    ref_sd, native_sd = ref.state_dict(), native.state_dict()
    assert sorted(native_sd) == sorted(ref_sd)
    assert {k: tuple(v.shape) for k, v in native_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_matches_diffusers(case):
    config, _, (h, w) = CASES[case]
    ref, native = _pair(config)
    z = torch.randn(2, config.latent_channels, h, w)
    with torch.no_grad():
        expected = ref.decode(z).sample
        out = native.decode(z)
    f = native.spatial_compression
    assert out.shape == (2, config.out_channels, h * f, w * f)
    assert rel_err(out, expected) < REL_TOL[torch.float32]
    with torch.no_grad():
        assert torch.equal(native(z), out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_matches_diffusers(case):
    config, (H, W), _ = CASES[case]
    ref, native = _pair(config, seed=1)
    x = torch.randn(2, config.in_channels, H, W)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = native.encode(x)
    f = native.spatial_compression
    expected_shape = (2, config.latent_channels, -(-H // f), -(-W // f))
    assert mean.shape == logvar.shape == expected_shape
    assert rel_err(mean, dist.mean) < REL_TOL[torch.float32]
    assert rel_err(logvar, dist.logvar) < REL_TOL[torch.float32]


def test_logvar_is_clamped_like_diffusers():
    config = CASES["one_block_quant_attn"][0]
    ref, native = _pair(config, seed=2)
    c = config.latent_channels
    with torch.no_grad():
        bias = torch.tensor([40.0, -45.0] * (c // 2) + [0.0] * (c % 2))
        for model in (ref, native):
            model.quant_conv.bias[c:] = bias
        x = torch.randn(1, config.in_channels, 6, 5)
        dist = ref.encode(x).latent_dist
        mean, logvar = native.encode(x)
    assert logvar.max() == 20.0 and logvar.min() == -30.0
    assert torch.equal(logvar, dist.logvar)
    assert rel_err(mean, dist.mean) < REL_TOL[torch.float32]


def test_meta_build_then_assign():
    config = CASES["three_blocks_mixed_quant"][0]
    ref, native = _pair(config, seed=3)
    with torch.device("meta"):
        lazy = AutoencoderKL(config)
    lazy.load_state_dict(ref.state_dict(), strict=True, assign=True)
    z = torch.randn(1, config.latent_channels, 3, 5)
    with torch.no_grad():
        assert torch.equal(lazy.decode(z), native.decode(z))


def test_flux_spec_matches_diffusers_layout():
    config = AUTOENCODER_KL_SPECS["flux"]
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**config.to_dict())
        native = AutoencoderKL(config)
    assert {k: tuple(v.shape) for k, v in native.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert native.spatial_compression == 8
    assert (native.scaling_factor, native.shift_factor) == (0.3611, 0.1159)
    assert config.latent_channels == 16 and not config.use_quant_conv and not config.use_post_quant_conv


def test_config_defaults_and_from_dict_match_diffusers():
    ref = diffusers.AutoencoderKL()
    ours = AutoencoderKLConfig.from_dict(dict(ref.config))
    assert ours == AutoencoderKLConfig()
    for field in dataclasses.fields(AutoencoderKLConfig):
        expected = ref.config[field.name]
        expected = tuple(expected) if isinstance(expected, list) else expected
        assert getattr(ours, field.name) == expected, field.name
    assert AutoencoderKL(ours).shift_factor == 0.0


@pytest.mark.parametrize(
    "field, bad_type",
    [("down_block_types", "AttnDownEncoderBlock2D"), ("up_block_types", "AttnUpDecoderBlock2D")],
)
def test_unsupported_block_type_is_rejected(field, bad_type):
    data = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [32, 32]}
    data[field][1] = bad_type
    with pytest.raises(CheckpointError, match=rf"^config.json: {field}: .*'{bad_type}'.*accepted"):
        AutoencoderKLConfig.from_dict(data)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"block_out_channels": (32, 64)}, "down_block_types"),
        ({"act_fn": "tanh"}, "act_fn"),
        ({"norm_num_groups": 24}, "norm_num_groups"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"scaling_factor": 0.0}, "scaling_factor: must not be 0"),  # FLUX's decode gave NaN pixels
    ],
)
def test_invalid_config_is_rejected(overrides, field):
    with pytest.raises(CheckpointError, match=field):
        AutoencoderKLConfig(**overrides)


def test_wrong_input_shapes_are_rejected():
    config = CASES["one_block_quant_attn"][0]
    native = AutoencoderKL(config)
    with pytest.raises(InvalidArgumentError, match=r"^z: .*\(batch, 4, height, width\)"):
        native.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(InvalidArgumentError, match=r"^x: .*\(batch, 3, height, width\)"):
        native.encode(torch.randn(3, 8, 8))


@torch.no_grad()
@pytest.mark.parametrize("case", ["one_block_quant_attn", "three_blocks_mixed_quant", "tiny_spec"])
def test_fused_kernels_match_diffusers(case):
    """``set_fused_kernels(True)`` (what a compiled pipeline does on a GPU): every norm (+ SiLU) runs
    ``diffc::group_norm`` on channels-last maps, the convolutions' biases folded into the next norm or residual add;
    decode and encode still match diffusers, and switching back restores the eager path exactly."""
    from diffc.ops.registry import COUNTERS, kernel_runs_on

    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    config, (H, W), (h, w) = CASES[case]
    ref, native = _pair(config, seed=2)
    z = torch.randn(2, config.latent_channels, h, w, generator=torch.Generator().manual_seed(3))
    x = torch.rand(2, config.in_channels, H, W, generator=torch.Generator().manual_seed(4)) * 2 - 1
    unfused = native.decode(z)
    native.set_fused_kernels(True)
    assert native.uses_fused_kernels
    convs = [m for m in native.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    COUNTERS.reset()
    out = native.decode(z)
    assert out.is_contiguous() and out.shape == unfused.shape
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in native.decoder.modules())
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in native.decoder.modules())
    assert COUNTERS.kernel_launches == norms + resnets  # every norm, and every resnet's bias + residual add
    assert rel_err(out, ref.decode(z).sample) < REL_TOL[torch.float32]
    assert rel_err(out, unfused) < 1e-5
    mean, logvar = native.encode(x)
    dist = ref.encode(x).latent_dist
    assert rel_err(mean, dist.mean) < REL_TOL[torch.float32]
    assert rel_err(logvar, dist.logvar) < REL_TOL[torch.float32]
    native.set_fused_kernels(False)
    assert not native.uses_fused_kernels and all(m.weight.is_contiguous() for m in convs)
    COUNTERS.reset()
    assert torch.equal(native.decode(z), unfused) and COUNTERS.kernel_launches == 0
    assert mean.stride() == native.encode(x)[0].stride()  # the moments in the eager path's layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 6, 10), (3, 5, 7, 9), (2, 4, 1, 3)], ids=["flux-like", "odd", "one-row"])
def test_channels_last_upsample_copies_nearest(shape, dtype):
    """The fused path's 2x upsampling of a channels-last map (one copy of a broadcast view) gives ``nearest``'s
    values and keeps the layout the next convolution reads; other maps take torch's kernel."""
    import torch.nn.functional as F

    from diffc.models.vae_blocks import upsample_nearest2x

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layout in (torch.channels_last, torch.contiguous_format):
        out = upsample_nearest2x(x.contiguous(memory_format=layout))
        assert torch.equal(out, F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert out.is_contiguous(memory_format=layout)


def test_fused_group_norm_falls_back_where_the_op_does_not_apply():
    """``FusedGroupNorm`` (the generic backend's diffusers VAEs) runs the op on a map of its weights' dtype, and
    torch's group norm on mixed dtypes (float32 weights, a bf16 map) and on a wrong channel count (torch's error)."""
    from diffc.models.vae_blocks import FusedGroupNorm, fuse_group_norms
    from diffc.ops.registry import COUNTERS, kernel_runs_on

    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    block = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.GroupNorm(2, 8))
    block[2].__class__ = type("OwnNorm", (torch.nn.GroupNorm,), {})  # a subclass keeps its own forward
    assert fuse_group_norms(block, True) == 1 and type(block[0]) is FusedGroupNorm
    assert type(block[2]).__name__ == "OwnNorm"
    x = torch.randn(2, 8, 3, 5)
    COUNTERS.reset()
    with torch.no_grad():
        torch.testing.assert_close(block[0](x), torch.nn.functional.group_norm(x, 4, block[0].weight, block[0].bias))
        assert COUNTERS.kernel_launches == 1
        block[0](x.bfloat16())  # float32 weights: torch's kernel
        assert COUNTERS.kernel_launches == 1
        with pytest.raises(RuntimeError):
            block[0](torch.randn(2, 6, 3, 5))
    assert fuse_group_norms(block, False) == 0 and type(block[0]) is torch.nn.GroupNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape,pad", [
    ((2, 3, 4, 5, 6), (1, 1, 1, 1, 2, 0)),   # HunyuanVideo's causal 3x3x3 padding
    ((1, 4, 1, 3, 3), (1, 1, 1, 1, 2, 0)),   # one frame, padded by two copies of it
    ((1, 2, 3, 4), (2, 0, 1, 3)),            # 2-D, uneven sides
    ((2, 3, 2), (4, 5)),                     # pads longer than the dimension
    ((1, 2, 3, 4, 5), (0, 0, 0, 0, 2, 0)),   # time only
    ((1, 2, 3, 4, 5), (1, 0, 0, 0, 0, 0)),   # one side of one dimension
    ((3, 2, 5), (0, 0)),                     # nothing to pad
], ids=["hunyuan", "one-frame", "2d", "long-pads", "time-only", "one-side", "no-pad"])
def test_replicate_pad_gives_torch_replication_padding(shape, pad, dtype):
    """``replicate_pad`` (the generic backend's causal convolutions) gives ``F.pad(mode="replicate")``'s values for
    every layout, corners clamped in every dimension, and keeps a channels-last input's layout."""
    import torch.nn.functional as F

    from diffc.models.vae_blocks import replicate_pad

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 100).to(dtype)
    layouts = [torch.contiguous_format] + ([torch.channels_last_3d] if len(shape) == 5 else
                                           [torch.channels_last] if len(shape) == 4 else [])
    for layout in layouts:
        xl = x.contiguous(memory_format=layout)
        out = replicate_pad(xl, pad)
        expected = F.pad(x.float() if dtype == torch.int64 else x, pad, mode="replicate")  # no integer CPU kernel
        assert torch.equal(out.to(expected.dtype), expected)
        assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    view = x.transpose(-1, -2)  # a strided input
    assert torch.equal(replicate_pad(view, pad).float(), F.pad(view.float(), pad, mode="replicate"))


def test_replicate_pad_leaves_what_torch_refuses_or_crops_to_torch():
    """Negative pads crop, as ``F.pad`` does; an odd-length pad, four padded dimensions or two of a 5-D map get
    ``F.pad``'s own error."""
    import torch.nn.functional as F

    from diffc.models.vae_blocks import replicate_pad

    x = torch.randn(1, 2, 4, 5, 6)
    assert torch.equal(replicate_pad(x[0], (-1, 2, 0, 1)), F.pad(x[0], (-1, 2, 0, 1), mode="replicate"))
    for pad in ((1, 1, 1), (1, 1, 1, 1, 1, 1, 1, 1), (1, 1, 1, 1)):
        with pytest.raises((RuntimeError, ValueError, NotImplementedError)) as ours:
            replicate_pad(x, pad)
        with pytest.raises(type(ours.value)):
            F.pad(x, pad, mode="replicate")
