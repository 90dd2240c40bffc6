"""Tiny FLUX and Wan pipelines (diffc and the diffusers oracle) and random LoRAs written in every format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import diffc
from tests.lora import writers as W

FLUX_KW = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)
WAN_KW = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)
PROMPT = "a red fox in snow"


@dataclasses.dataclass
class Family:
    ckpt: Path
    pipe: "diffc.pipelines.base.Pipeline"
    base: dict[str, torch.Tensor]  # the DiT's original weights
    files: dict[str, Path]  # format -> LoRA file
    loras: dict[str, W.RandomLora]  # adapter -> what it holds
    kw: dict

    def reset(self) -> None:
        if getattr(self.pipe, "_lora", None) is not None:
            self.pipe.unmerge_lora_weights()
            self.pipe._lora = None


@pytest.fixture(scope="session")
def flux_lora(flux_checkpoint, tmp_path_factory):
    """dev-tiny FLUX (1 double + 2 single blocks): adapter ``full`` on every linear layer, ``double`` on the
    double blocks only (what diffusers' kohya/XLabs converters handle at tiny sizes), ``second`` another one."""
    import diffusers

    root = tmp_path_factory.mktemp("flux-lora")
    ckpt = flux_checkpoint("dev-tiny")
    pipe = diffc.load(ckpt, device="cpu")
    dit = pipe.components["transformer"]
    full = W.random_lora(dit, W.linear_modules(dit), seed=1, magnitude=0.1)
    double = W.random_lora(dit, W.linear_modules(dit, lambda n: n.startswith("transformer_blocks.")), seed=2,
                           magnitude=0.3)
    second = W.random_lora(dit, W.linear_modules(dit, lambda n: ".attn." in n), seed=3, rank=2, alpha=1.0,
                           magnitude=0.4)
    files = {
        "diffusers": W.write_diffusers(full, root / "diffusers", diffusers.FluxPipeline),
        "diffusers-alpha-keys": W.write_keys(W.diffusers_with_alpha_keys(full), root / "alpha.safetensors"),
        "peft-lora_down": W.write_keys(W.diffusers_with_alpha_keys(full, "lora_down", "lora_up"), root / "down.safetensors"),
        "kohya": W.write_flux_kohya(full, 1, 2, root / "kohya.safetensors"),
        "comfyui": W.write_flux_kohya(full, 1, 2, root / "comfy.safetensors", prefix="diffusion_model.", underscore=False),
        "bfl": W.write_flux_bfl(full, 1, 2, root / "bfl.safetensors"),
        "xlabs": W.write_flux_xlabs(full, 1, 2, root / "xlabs.safetensors"),
        "double-diffusers": W.write_diffusers(double, root / "double", diffusers.FluxPipeline),
        "double-kohya": W.write_flux_kohya(double, 1, 0, root / "double-kohya.safetensors"),
        "double-xlabs": W.write_flux_xlabs(double, 1, 0, root / "double-xlabs.safetensors"),
        "second": W.write_diffusers(second, root / "second", diffusers.FluxPipeline),
    }
    files["kohya-diffusers-names"] = W.write_kohya_diffusers_names(full, root / "mixture.safetensors")
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    family = Family(ckpt, pipe, base, files, {"full": full, "double": double, "second": second}, FLUX_KW)
    yield family


@pytest.fixture(scope="session")
def wan_lora(tmp_path_factory):
    """Tiny Wan2.1 (2 blocks): adapter ``full`` on every attention and FFN projection of the blocks."""
    import diffusers

    from tests.pipelines.conftest import WAN_VARIANTS, build_wan_pipeline

    root = tmp_path_factory.mktemp("wan-lora")
    build_wan_pipeline(WAN_VARIANTS["base"], root / "tok").save_pretrained(root / "ckpt", safe_serialization=True)
    pipe = diffc.load(root / "ckpt", device="cpu")
    dit = pipe.components["transformer"]
    full = W.random_lora(dit, W.linear_modules(dit, lambda n: n.startswith("blocks.")), seed=4, magnitude=0.3)
    files = {
        "diffusers": W.write_diffusers(full, root / "diffusers", diffusers.WanPipeline),
        "wan": W.write_wan_original(full, root / "wan.safetensors"),
        "wan-lora_A": W.write_wan_original(full, root / "wan-a.safetensors", "lora_A", "lora_B", alpha=False),
        "musubi": W.write_wan_original(full, root / "musubi.safetensors", prefix="lora_unet_", underscore=True),
    }
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    yield Family(root / "ckpt", pipe, base, files, {"full": full}, WAN_KW)


@pytest.fixture
def flux(flux_lora):
    flux_lora.reset()
    yield flux_lora
    flux_lora.reset()


@pytest.fixture
def wan(wan_lora):
    wan_lora.reset()
    yield wan_lora
    wan_lora.reset()
