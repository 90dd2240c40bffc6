"""Every LoRA format, converted and merged: the weights equal W + strength * alpha/r * B @ A, untouched ones stay."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import CheckpointError
from tests.lora import writers as W

FLUX_FORMATS = {
    # format -> (adapter, which modules the format carries)
    "diffusers": ("full", lambda m: True),
    "diffusers-alpha-keys": ("full", lambda m: True),
    "peft-lora_down": ("full", lambda m: True),
    "kohya-diffusers-names": ("full", lambda m: True),
    "kohya": ("full", lambda m: True),
    "comfyui": ("full", lambda m: True),
    "bfl": ("full", lambda m: True),
    "xlabs": ("full", W.xlabs_covers),
}
EXPECTED_FORMAT = {"diffusers": "diffusers", "diffusers-alpha-keys": "diffusers", "peft-lora_down": "diffusers",
                   "kohya-diffusers-names": "kohya (diffusers names)", "kohya": "kohya (bfl names)",
                   "comfyui": "bfl", "bfl": "bfl", "xlabs": "xlabs", "wan": "wan", "wan-lora_A": "wan",
                   "musubi": "kohya (wan names)"}


def check_merged(family, adapter: W.RandomLora, covers, strength: float) -> None:
    weights = dict(family.pipe.components["transformer"].named_parameters())
    subset = W.RandomLora({m: p for m, p in adapter.pairs.items() if covers(m)}, adapter.rank, adapter.alpha)
    expected = subset.expected(family.base, strength)
    assert expected, "the format carries no module: the check would prove nothing"
    for name, tensor in weights.items():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=2e-6, msg=name)
            assert not torch.equal(tensor, family.base[name]), name
        else:
            assert torch.equal(tensor, family.base[name]), f"{name} changed but the LoRA does not touch it"


@pytest.mark.parametrize("fmt", sorted(FLUX_FORMATS))
def test_flux_format_merges_exactly(flux, fmt):
    adapter, covers = FLUX_FORMATS[fmt]
    info = flux.pipe.set_lora(fmt, flux.files[fmt], strength=0.6)
    check_merged(flux, flux.loras[adapter], covers, 0.6)
    (loaded,) = info["loaded_adapters"]
    assert loaded["format"] == [EXPECTED_FORMAT[fmt]]
    assert loaded["warnings"] == []
    assert info["active"]["transformer"] == [{"nickname": fmt, "path": str(flux.files[fmt]), "strength": 0.6,
                                              "merged": True}]


@pytest.mark.parametrize("fmt", ["diffusers", "wan", "wan-lora_A", "musubi"])
def test_wan_format_merges_exactly(wan, fmt):
    info = wan.pipe.set_lora(fmt, wan.files[fmt], strength=-0.8)
    check_merged(wan, wan.loras["full"], lambda m: True, -0.8)
    assert info["loaded_adapters"][0]["format"] == [EXPECTED_FORMAT[fmt]]


def test_flux_folder_path_and_final_layer_swap(flux, tmp_path):
    """A folder holding one file is that file; BFL's final modulation (shift, scale) lands swapped."""
    dit = flux.pipe.components["transformer"]
    lora = W.random_lora(dit, ["norm_out.linear", "proj_out"], seed=9)
    folder = tmp_path / "folder"
    W.write_flux_kohya(lora, 1, 2, folder / "my_lora.safetensors")
    flux.pipe.set_lora("final", folder, strength=1.0)
    check_merged(flux, lora, lambda m: True, 1.0)


def test_bfl_norm_scales_replace_norm_weights(flux, tmp_path):
    dit = flux.pipe.components["transformer"]
    lora = W.random_lora(dit, ["transformer_blocks.0.attn.to_q"], seed=5)
    q = torch.rand(16) + 0.5
    path = W.write_flux_bfl(lora, 1, 2, tmp_path / "control.safetensors",
                            norms={"double_blocks.0.img_attn.norm.query_norm.scale": q})
    flux.pipe.set_lora("control", path)
    assert torch.equal(dit.transformer_blocks[0].attn.norm_q.weight, q)
    flux.pipe.unmerge_lora_weights()
    assert torch.equal(dit.transformer_blocks[0].attn.norm_q.weight, flux.base["transformer_blocks.0.attn.norm_q.weight"])


def test_wan_diff_and_diff_b_keys_add_full_deltas(wan, tmp_path):
    """Distillation LoRAs carry full deltas (``.diff``, ``.diff_b``) beside the low-rank pairs."""
    dit = wan.pipe.components["transformer"]
    g = torch.Generator().manual_seed(0)
    w = dit.blocks[0].attn1.to_q.weight
    diff, diff_b = torch.randn(w.shape, generator=g) * 0.01, torch.randn(w.shape[0], generator=g) * 0.01
    table = torch.randn(dit.scale_shift_table.shape, generator=g) * 0.01
    path = W.write_keys({"diffusion_model.blocks.0.self_attn.q.diff": diff,
                         "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
                         "diffusion_model.head.modulation.diff": table}, tmp_path / "diff.safetensors")
    wan.pipe.set_lora("diff", path, strength=0.5)
    torch.testing.assert_close(w, wan.base["blocks.0.attn1.to_q.weight"] + 0.5 * diff)
    torch.testing.assert_close(dit.blocks[0].attn1.to_q.bias, wan.base["blocks.0.attn1.to_q.bias"] + 0.5 * diff_b)
    torch.testing.assert_close(dit.scale_shift_table, wan.base["scale_shift_table"] + 0.5 * table)


def test_partial_match_warns_with_counts_and_text_encoder_keys_are_reported(flux, tmp_path):
    dit = flux.pipe.components["transformer"]
    lora = W.random_lora(dit, ["transformer_blocks.0.attn.to_k"], seed=6)
    tensors = W.diffusers_with_alpha_keys(lora)
    tensors["transformer.no_such_block.lora_A.weight"] = torch.zeros(4, 8)
    tensors["transformer.no_such_block.lora_B.weight"] = torch.zeros(8, 4)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    info = flux.pipe.set_lora("partial", W.write_keys(tensors, tmp_path / "partial.safetensors"))
    warnings = info["loaded_adapters"][0]["warnings"]
    assert any("3 of 5 keys applied" in w and "transformer.no_such_block.lora_A.weight" in w for w in warnings)
    assert any("text-encoder" in w and "lora_te1_text_model_encoder_layers_0_mlp_fc1" in w for w in warnings)
    check_merged(flux, lora, lambda m: True, 1.0)


def test_a_file_matching_nothing_is_an_error_listing_its_keys(flux, tmp_path):
    path = W.write_keys({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 3),
                         "unet.down_blocks.0.lora_B.weight": torch.zeros(3, 2)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"no key of this LoRA matches transformer .*unet\.down_blocks\.0\.lora_A"):
        flux.pipe.set_lora("sdxl", path)
    assert flux.pipe.list_loras()["loaded_adapters"] == []


def test_wrong_shapes_are_an_error_naming_the_module(flux, tmp_path):
    path = W.write_keys({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
                         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
                        tmp_path / "other-size.safetensors")
    with pytest.raises(CheckpointError, match=r"to_q.*7 input features.*another model or size"):
        flux.pipe.set_lora("other", path)
