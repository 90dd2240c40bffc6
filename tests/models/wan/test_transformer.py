"""Parity of the native Wan2.1 transformer with diffusers' WanTransformer3DModel (the oracle)."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel, WanTransformerConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")

# Tiny configs: odd head counts, head dims whose 3-D RoPE split differs (12 -> 4/4/4, 16 -> 8/4/4 after
# flooring, 24 -> 8/8/8), odd FFN widths, cross-attention norm on and off, a temporal patch of 2.
# Production: 1.3B is 12 heads x 128, ffn 8960, 30 layers; 14B is 40 x 128, ffn 13824, 40 layers.
TINY_CONFIGS = {
    "h2d12": dict(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=37, num_layers=1, cross_attn_norm=True,
    ),
    "h3d16": dict(
        num_attention_heads=3, attention_head_dim=16, in_channels=3, out_channels=5, text_dim=20,
        freq_dim=15, ffn_dim=29, num_layers=2, cross_attn_norm=False, eps=1e-5,
    ),
    "h3d24_pt2": dict(
        patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=24, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=32, ffn_dim=51, num_layers=3, cross_attn_norm=True,
    ),
}

# (frames, height, width) of the latent input; non-square, 1-3 latent frames after patching.
SHAPES = {
    "h2d12": [(1, 6, 4), (2, 4, 10), (3, 8, 6)],
    "h3d16": [(1, 4, 6), (3, 10, 4)],
    "h3d24_pt2": [(2, 6, 4), (6, 4, 8)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]
TEXT_LEN = 7
KEEP_FP32 = WanTransformer3DModel._keep_in_fp32_modules


def make_pair(name: str, seed: int = 0):
    """A diffusers model with random weights (norm weights perturbed too) and the native copy."""
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(**TINY_CONFIGS[name]).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.copy_((1.0 if pname.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    native = WanTransformer3DModel(WanTransformerConfig.from_dict(dict(ref.config))).eval()
    native.load_state_dict(ref.state_dict(), strict=True)
    return ref, native


def make_inputs(cfg: dict, shape, batch: int = 2, seed: int = 1, per_token: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *shape, generator=g)
    if per_token:
        tokens = 1
        for n, p in zip(shape, cfg.get("patch_size", (1, 2, 2))):
            tokens *= n // p
        t = torch.rand(batch, tokens, generator=g) * 1000
    else:
        t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, TEXT_LEN, cfg["text_dim"], generator=g)
    return x, t, text


def cast_like_loader(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every tensor to ``dtype`` except those named by ``_keep_in_fp32_modules`` (kept float32)."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            keep = any(frag in name.split(".") for frag in (*KEEP_FP32, "rope"))
            t.data = t.data.to(torch.float32 if keep else dtype)


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_fp32_parity(name, shape):
    ref, native = make_pair(name)
    x, t, text = make_inputs(TINY_CONFIGS[name], shape)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        out = native(x, t, text)
    out_channels = TINY_CONFIGS[name]["out_channels"]
    assert out.shape == (2, out_channels, *shape) == expected.shape
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("name", ["h2d12", "h3d24_pt2"])
def test_per_token_timestep_parity(name):
    ref, native = make_pair(name)
    x, t, text = make_inputs(TINY_CONFIGS[name], SHAPES[name][-1], per_token=True)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        out = native(x, t, text)
    assert rel_err(out, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_bf16_parity(name):
    ref, native = make_pair(name)
    cast_like_loader(ref, torch.bfloat16)
    cast_like_loader(native, torch.bfloat16)
    assert native.blocks[0].scale_shift_table.dtype == torch.float32
    assert native.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    x, t, text = make_inputs(TINY_CONFIGS[name], SHAPES[name][-1])
    x, text = x.bfloat16(), text.bfloat16()
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        out = native(x, t, text)
    assert out.dtype == torch.bfloat16 == expected.dtype
    assert rel_err(out, expected) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_state_dict_keys_match(name):
    ref, native = make_pair(name)
    ref_sd, native_sd = ref.state_dict(), native.state_dict()
    assert list(native_sd) == list(ref_sd)
    assert {k: v.shape for k, v in native_sd.items()} == {k: v.shape for k, v in ref_sd.items()}


@pytest.mark.parametrize("spec", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_published_specs_match_diffusers_layout(spec):
    config = WAN_TRANSFORMER_SPECS[spec]
    with torch.device("meta"):
        native = WanTransformer3DModel(config)
        ref = diffusers.WanTransformer3DModel(**config.to_dict())
    assert {k: v.shape for k, v in native.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert WanTransformerConfig.from_dict(dict(ref.config)) == config


def test_meta_build_then_assign_runs():
    ref, _ = make_pair("h2d12")
    config = WanTransformerConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        native = WanTransformer3DModel(config)
    native.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not list(native.buffers())
    x, t, text = make_inputs(TINY_CONFIGS["h2d12"], (2, 4, 6))
    with torch.no_grad():
        assert rel_err(native(x, t, text), ref(x, t, text, return_dict=False)[0]) < REL_TOL[torch.float32]


def test_class_attributes():
    assert WanTransformer3DModel.config_class is WanTransformerConfig
    assert WanTransformer3DModel._repeated_blocks == ("blocks",)
    assert set(KEEP_FP32) == set(diffusers.WanTransformer3DModel._keep_in_fp32_modules) - {"rope"}
    WanTransformer3DModel(WAN_TRANSFORMER_SPECS["tiny"])


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(image_dim=1280), "must be set together"),
        (dict(added_kv_proj_dim=5120), "must be set together"),
        (dict(image_dim=1280, added_kv_proj_dim=5120), "added_kv_proj_dim must equal the model width"),
        (dict(qk_norm="rms_norm"), "qk_norm"),
        (dict(qk_norm=None), "qk_norm"),
        (dict(attention_head_dim=13), "attention_head_dim"),
        (dict(patch_size=(1, 2)), "patch_size"),
    ],
)
def test_unsupported_config_errors(fields, match):
    with pytest.raises(CheckpointError, match=match):
        WanTransformerConfig(**{**TINY_CONFIGS["h2d12"], **fields})


def test_unsupported_config_from_json_dict():
    data = {"_class_name": "WanTransformer3DModel", **TINY_CONFIGS["h2d12"], "image_dim": 1280}
    with pytest.raises(CheckpointError, match="image-to-video"):
        WanTransformerConfig.from_dict(data)  # image_dim without added_kv_proj_dim


def _bad_inputs():
    x, t, text = make_inputs(TINY_CONFIGS["h2d12"], (2, 4, 6))
    return [
        ("hidden_states", (x[:, :3], t, text)),
        ("hidden_states", (x[:, :, 0], t, text)),
        ("hidden_states", (x[..., :5], t, text)),
        ("timestep", (x, t[:1], text)),
        ("timestep", (x, t[:, None].expand(2, 5), text)),
        ("encoder_hidden_states", (x, t, text[..., :15])),
        ("encoder_hidden_states", (x, t, text[:1])),
    ]


@pytest.mark.parametrize("field,args", _bad_inputs())
def test_bad_input_errors(field, args):
    native = WanTransformer3DModel(WanTransformerConfig(**TINY_CONFIGS["h2d12"]))
    with pytest.raises(InvalidArgumentError, match=field):
        native(*args)


def test_grid_beyond_rope_table_is_refused():
    native = WanTransformer3DModel(WanTransformerConfig(**TINY_CONFIGS["h2d12"], rope_max_seq_len=4))
    x, t, text = make_inputs(TINY_CONFIGS["h2d12"], (1, 4, 10))
    with pytest.raises(InvalidArgumentError, match="rope_max_seq_len"):
        native(x, t, text)
