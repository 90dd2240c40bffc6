"""Parity of the native FLUX.1 transformer with diffusers' FluxTransformer2DModel (the oracle)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from diffc.errors import InvalidArgumentError
from diffc.models.flux.blocks import apply_rope, rope_tables
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel, FluxTransformerConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel as RefFlux  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # noqa: E402

# Tiny configs: odd head counts, head dims 16/24, 1-2 double and 1-3 single blocks, with and
# without guidance. Production: 24 heads x 128, axes (16, 56, 56), 19 + 38 blocks.
CONFIGS = {
    "h2d16_guidance": dict(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ),
    "h3d24_noguidance_outch": dict(
        in_channels=12, out_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=24,
        num_attention_heads=3, joint_attention_dim=20, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 8, 8),
    ),
    "h3d16_guidance_patch2": dict(
        patch_size=2, in_channels=8, num_layers=1, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
        axes_dims_rope=(2, 6, 8),
    ),
}
# (batch, latent grid height, latent grid width, text tokens)
SHAPES = {"h2d16_guidance": (2, 4, 6, 5), "h3d24_noguidance_outch": (1, 3, 5, 7), "h3d16_guidance_patch2": (2, 3, 5, 4)}


def _img_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _pair(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    ref = RefFlux(**CONFIGS[name]).eval()
    model = FluxTransformer2DModel(FluxTransformerConfig(**CONFIGS[name])).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), model.to(dtype)


def _inputs(name: str, dtype=torch.float32) -> dict:
    cfg = CONFIGS[name]
    batch, h, w, n_txt = SHAPES[name]
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, cfg["in_channels"], generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg["joint_attention_dim"], generator=g, dtype=dtype),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g, dtype=dtype),
        timestep=torch.rand(batch, generator=g).to(dtype) * 0.9 + 0.05,
        img_ids=_img_ids(h, w),
        txt_ids=torch.randn(n_txt, 3, generator=g),
        guidance=torch.full((batch,), 3.5, dtype=dtype) if cfg["guidance_embeds"] else None,
    )
    return inputs


def _expected_shape(name: str) -> tuple[int, int, int]:
    cfg = CONFIGS[name]
    batch, h, w, _ = SHAPES[name]
    out_ch = cfg.get("out_channels") or cfg["in_channels"]
    return (batch, h * w, cfg.get("patch_size", 1) ** 2 * out_ch)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_parity(name):
    ref, model = _pair(name)
    inputs = _inputs(name)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        out = model(**inputs)
    assert out.shape == expected.shape == _expected_shape(name)
    assert rel_err(out, expected) < REL_TOL[torch.float32]


def test_bf16_parity():
    name = "h3d24_noguidance_outch"
    ref, model = _pair(name, torch.bfloat16)
    inputs = _inputs(name, torch.bfloat16)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        out = model(**inputs)
    assert out.dtype == torch.bfloat16 and out.shape == _expected_shape(name)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_match_diffusers(name):
    torch.manual_seed(0)
    ref_keys = sorted(RefFlux(**CONFIGS[name]).state_dict())
    model = FluxTransformer2DModel(FluxTransformerConfig(**CONFIGS[name]))
    assert sorted(model.state_dict()) == ref_keys


def test_rope_matches_diffusers():
    ids = torch.cat([torch.randn(3, 3), _img_ids(3, 5)])
    axes = (4, 6, 6)
    cos, sin = rope_tables(ids, axes)
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    x = torch.randn(2, 3, ids.shape[0], sum(axes))  # (batch, heads, seq, head_dim)
    ref = apply_rotary_emb(x.transpose(1, 2), (ref_cos, ref_sin), sequence_dim=1).transpose(1, 2)
    assert torch.equal(apply_rope(x, cos, sin), ref)


def test_missing_guidance_raises():
    name = "h2d16_guidance"
    _, model = _pair(name)
    inputs = _inputs(name) | {"guidance": None}
    with pytest.raises(InvalidArgumentError, match="guidance.*guidance_embeds=True"):
        model(**inputs)


def test_unexpected_guidance_raises():
    name = "h3d24_noguidance_outch"
    _, model = _pair(name)
    inputs = _inputs(name) | {"guidance": torch.full((1,), 3.5)}
    with pytest.raises(InvalidArgumentError, match="guidance.*guidance_embeds=False"):
        model(**inputs)


@pytest.mark.parametrize(
    "field, bad",
    [
        ("hidden_states", lambda i: i["hidden_states"][..., :-1]),
        ("encoder_hidden_states", lambda i: i["encoder_hidden_states"][:1]),
        ("pooled_projections", lambda i: i["pooled_projections"][:, :-1]),
        ("timestep", lambda i: i["timestep"][:, None]),
        ("img_ids", lambda i: i["img_ids"][None]),
        ("txt_ids", lambda i: i["txt_ids"][:-1]),
        ("guidance", lambda i: torch.full((3,), 3.5)),
    ],
)
def test_bad_input_shapes_raise(field, bad):
    name = "h2d16_guidance"
    _, model = _pair(name)
    inputs = _inputs(name)
    inputs[field] = bad(inputs)
    with pytest.raises(InvalidArgumentError, match=f"^{field}: "):
        model(**inputs)


def test_axes_dims_rope_must_sum_to_head_dim():
    with pytest.raises(InvalidArgumentError, match="axes_dims_rope"):
        FluxTransformerConfig(attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(InvalidArgumentError, match="axes_dims_rope"):
        FluxTransformerConfig(attention_head_dim=15, axes_dims_rope=(5, 5, 5))


def test_config_defaults_match_diffusers():
    params = inspect.signature(RefFlux.__init__).parameters
    ours = {f.name: f.default for f in dataclasses.fields(FluxTransformerConfig)}
    theirs = {name: params[name].default for name in ours}
    assert ours == {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in theirs.items()}


def test_specs_and_from_dict():
    dev, schnell = FLUX_TRANSFORMER_SPECS["flux-dev"], FLUX_TRANSFORMER_SPECS["flux-schnell"]
    assert dev.guidance_embeds and not schnell.guidance_embeds
    assert (dev.num_layers, dev.num_single_layers, dev.inner_dim) == (19, 38, 3072)
    config_json = {"_class_name": "FluxTransformer2DModel", "axes_dims_rope": [16, 56, 56], "guidance_embeds": True}
    assert FluxTransformerConfig.from_dict(config_json) == dev
    tiny = FluxTransformer2DModel(FLUX_TRANSFORMER_SPECS["tiny"])
    assert sorted(tiny.state_dict()) == sorted(RefFlux(**FLUX_TRANSFORMER_SPECS["tiny"].to_dict()).state_dict())


def test_meta_build_then_load():
    name = "h2d16_guidance"
    ref, _ = _pair(name)
    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxTransformerConfig(**CONFIGS[name]))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    inputs = _inputs(name)
    with torch.no_grad():
        assert rel_err(model(**inputs), ref(**inputs, return_dict=False)[0]) < REL_TOL[torch.float32]


def test_traces_without_graph_breaks():
    name = "h2d16_guidance"
    _, model = _pair(name)
    inputs = _inputs(name)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(**inputs), model(**inputs)) == 0.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_precomputed_modulation_matches_diffusers(name):
    """forward(modulation=model.modulation(...)): the blocks read their projections from the precomputed rows."""
    ref, model = _pair(name)
    inputs = _inputs(name)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        plain = model(**inputs)
        mod = model.modulation(inputs["timestep"], inputs["pooled_projections"], inputs["guidance"])
        out = model(**inputs, modulation=mod)
    dim = model.config.inner_dim
    assert mod.shape == (SHAPES[name][0], model.modulation_width)
    assert model.modulation_width == dim * (12 * len(model.transformer_blocks)
                                            + 3 * len(model.single_transformer_blocks) + 2)
    assert rel_err(out, expected) < REL_TOL[torch.float32]
    assert rel_err(out, plain) < 1e-6
    other = model.modulation(inputs["timestep"] * 0.5, inputs["pooled_projections"], inputs["guidance"])
    with torch.no_grad():
        assert rel_err(model(**inputs, modulation=other), plain) > 1e-3  # the blocks do read it


def test_modulation_rows_are_independent_steps():
    """One call over (step, sample) rows gives each row what a call for that row alone gives."""
    name = "h2d16_guidance"
    _, model = _pair(name)
    g = torch.Generator().manual_seed(3)
    steps = torch.rand(5, generator=g)
    pooled = torch.randn(1, CONFIGS[name]["pooled_projection_dim"], generator=g)
    guidance = torch.full((5,), 4.0)
    table = model.modulation(steps, pooled.repeat(5, 1), guidance)
    for i in range(5):
        one = model.modulation(steps[i:i + 1], pooled, guidance[:1])
        torch.testing.assert_close(table[i:i + 1], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 7), (1,), (3, None)])
def test_bad_modulation_shape_raises(shape):
    name = "h2d16_guidance"
    _, model = _pair(name)
    inputs = _inputs(name)
    shape = tuple(model.modulation_width if s is None else s for s in shape)
    with pytest.raises(InvalidArgumentError, match="modulation") as info, torch.no_grad():
        model(**inputs, modulation=torch.zeros(shape))
    assert str(model.modulation_width) in str(info.value)


def test_modulation_input_errors():
    _, model = _pair("h2d16_guidance")
    with pytest.raises(InvalidArgumentError, match="guidance"):
        model.modulation(torch.rand(2), torch.randn(2, 24))
    with pytest.raises(InvalidArgumentError, match="timestep"):
        model.modulation(torch.rand(2), torch.randn(3, 24), torch.ones(2))
