"""Parity of the native Qwen-Image transformer with diffusers' QwenImageTransformer2DModel (the oracle)."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.qwen_image.transformer import QwenImageTransformer2DModel, QwenImageTransformerConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")

# Tiny configs (production Qwen-Image: 60 blocks, 24 heads of 128, text 3584, axes (16, 56, 56), in 64, out 16).
CONFIGS = {
    "h2d16": dict(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    "h3d24": dict(in_channels=8, out_channels=2, num_layers=1, attention_head_dim=24, num_attention_heads=3,
                  joint_attention_dim=20, axes_dims_rope=(8, 8, 8)),
}
# (batch, image shapes (frames, rows, columns) in sequence order, text tokens): odd rows/columns exercise the
# centred RoPE positions; two and three shapes are Qwen-Image-Edit's generated image plus condition images.
CASES = {
    "t2i": ("h2d16", 2, ((1, 3, 5),), 7),
    "edit-one": ("h2d16", 1, ((1, 4, 4), (1, 3, 5)), 6),
    "edit-two": ("h3d24", 1, ((1, 2, 4), (1, 3, 3), (1, 5, 2)), 5),
}


def _pair(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**CONFIGS[name]).eval()
    model = QwenImageTransformer2DModel(QwenImageTransformerConfig(**CONFIGS[name])).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), model.to(dtype)


def _inputs(name: str, batch: int, shapes, n_txt: int, dtype=torch.float32, padded: bool = False):
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    seq = sum(f * h * w for f, h, w in shapes)
    mask = None
    if padded:  # the first prompt is two tokens shorter: its last two states are padding
        mask = torch.ones(batch, n_txt, dtype=torch.long)
        mask[0, -2:] = 0
    return dict(hidden_states=torch.randn(batch, seq, cfg["in_channels"], generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, n_txt, cfg["joint_attention_dim"], generator=g, dtype=dtype),
                timestep=(torch.rand(batch, generator=g) * 0.9 + 0.05).to(dtype),
                encoder_hidden_states_mask=mask)


def _run_both(ref, model, inputs, shapes, batch):
    with torch.no_grad():
        expected = ref(img_shapes=[list(shapes)] * batch, return_dict=False, **inputs)[0]
        out = model(img_shapes=shapes, **inputs)
    return out, expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_fp32(case):
    name, batch, shapes, n_txt = CASES[case]
    ref, model = _pair(name)
    inputs = _inputs(name, batch, shapes, n_txt)
    out, expected = _run_both(ref, model, inputs, shapes, batch)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < REL_TOL[torch.float32]


def test_text_padding_mask_matches_diffusers():
    ref, model = _pair("h2d16")
    shapes = ((1, 3, 5),)
    inputs = _inputs("h2d16", 2, shapes, 7, padded=True)
    out, expected = _run_both(ref, model, inputs, shapes, 2)
    assert rel_err(out, expected) < REL_TOL[torch.float32]
    # the mask acts: without it the padded sample changes, the unpadded one does not
    unmasked = model(img_shapes=shapes, **{**inputs, "encoder_hidden_states_mask": None})
    assert rel_err(unmasked[0], out[0]) > 1e-3
    assert rel_err(unmasked[1], out[1]) < 1e-6


def test_matches_diffusers_bf16():
    name, batch, shapes, n_txt = CASES["edit-one"]
    ref, model = _pair(name, torch.bfloat16)
    out, expected = _run_both(ref, model, _inputs(name, batch, shapes, n_txt, torch.bfloat16), shapes, batch)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) < REL_TOL[torch.bfloat16]


def test_takes_diffusers_per_sample_img_shapes():
    name, batch, shapes, n_txt = CASES["t2i"]
    ref, model = _pair(name)
    inputs = _inputs(name, batch, shapes, n_txt)
    out, expected = _run_both(ref, model, inputs, shapes, batch)
    with torch.no_grad():
        assert torch.equal(model(img_shapes=[list(shapes)] * batch, **inputs), out)
    with pytest.raises(InvalidArgumentError, match="img_shapes: every sample"):
        model(img_shapes=[[(1, 3, 5)], [(1, 5, 3)]], **inputs)


def test_bad_inputs_name_the_field():
    _, model = _pair("h2d16")
    shapes = ((1, 3, 5),)
    inputs = _inputs("h2d16", 1, shapes, 4)
    with pytest.raises(InvalidArgumentError, match="img_shapes.*give 12 tokens, hidden_states has 15"):
        model(img_shapes=((1, 3, 4),), **inputs)
    with pytest.raises(InvalidArgumentError, match="encoder_hidden_states_mask"):
        model(img_shapes=shapes, **{**inputs, "encoder_hidden_states_mask": torch.ones(1, 3)})
    with pytest.raises(InvalidArgumentError, match="hidden_states"):
        model(img_shapes=shapes, **{**inputs, "hidden_states": torch.zeros(1, 15, 7)})


def test_unsupported_variants_are_refused():
    with pytest.raises(CheckpointError, match="zero_cond_t=true is not supported"):
        QwenImageTransformerConfig.from_dict({**CONFIGS["h2d16"], "zero_cond_t": True})
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        QwenImageTransformerConfig.from_dict({**CONFIGS["h2d16"], "axes_dims_rope": [4, 4, 4]})


def test_rope_tables_are_kept_per_layout_and_bounded(monkeypatch):
    """A layout's RoPE tables are built once (no host build or copy on later steps), a new layout gets its own
    (alternating layouts still match diffusers), and the cache holds at most ROPE_CACHE_LAYOUTS layouts."""
    from diffc.models.qwen_image import transformer as qt

    name, batch, shapes, n_txt = CASES["t2i"]
    ref, model = _pair(name)
    other = ((1, 5, 3),)
    builds = []
    real = qt.rope_tables
    monkeypatch.setattr(qt, "rope_tables", lambda *a, **k: builds.append(1) or real(*a, **k))
    for layout in (shapes, other, shapes, other):
        inputs = _inputs(name, batch, layout, n_txt)
        out, expected = _run_both(ref, model, inputs, layout, batch)
        assert rel_err(out, expected) < REL_TOL[torch.float32]
    assert len(builds) == 2
    monkeypatch.setattr(qt, "ROPE_CACHE_LAYOUTS", 2)
    with torch.no_grad():
        for rows in (2, 4, 6):
            model(img_shapes=((1, rows, 3),), **_inputs(name, 1, ((1, rows, 3),), n_txt))
    assert len(model._rope_cache) == 2


@pytest.mark.parametrize("case,padded", [("t2i", True), ("edit-two", False)])
def test_precomputed_modulation_matches_diffusers(case, padded):
    """forward(modulation=model.modulation(t)): each block reads its img_mod / txt_mod columns; one row (a step's
    timestep, all samples alike) serves the whole batch."""
    name, batch, shapes, n_txt = CASES[case]
    ref, model = _pair(name)
    inputs = _inputs(name, batch, shapes, n_txt, padded=padded)
    inputs["timestep"] = inputs["timestep"][:1].expand(batch)  # one step: every sample at the same timestep
    out_ref, expected = _run_both(ref, model, inputs, shapes, batch)
    mod = model.modulation(inputs["timestep"][:1])
    assert mod.shape == (1, model.modulation_width) == (1, model.config.inner_dim * (12 * len(model.transformer_blocks) + 2))
    with torch.no_grad():
        out = model(img_shapes=shapes, modulation=mod, **inputs)
        rows = model(img_shapes=shapes, modulation=model.modulation(inputs["timestep"]), **inputs)
        other = model(img_shapes=shapes, modulation=model.modulation(inputs["timestep"][:1] * 0.5), **inputs)
    assert rel_err(out, expected) < REL_TOL[torch.float32]
    assert rel_err(out, out_ref) < 1e-6 and rel_err(rows, out_ref) < 1e-6
    assert rel_err(other, out_ref) > 1e-3  # the blocks do read it


def test_bad_modulation_names_the_field():
    name, batch, shapes, n_txt = CASES["t2i"]
    _, model = _pair(name)
    inputs = _inputs(name, batch, shapes, n_txt)
    for bad in (torch.zeros(batch, 5), torch.zeros(3, model.modulation_width), torch.zeros(model.modulation_width)):
        with pytest.raises(InvalidArgumentError, match="modulation"), torch.no_grad():
            model(img_shapes=shapes, modulation=bad, **inputs)
    with pytest.raises(InvalidArgumentError, match="timestep"):
        model.modulation(torch.rand(2, 1))
