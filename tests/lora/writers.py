"""Random LoRA adapters for tiny models, written in every format diffusers loads for FLUX and Wan.

An adapter is made in diffusers/PEFT names (``up``/``down`` per native module, one scale alpha/r);
each writer renames it as that tool names its keys, fusing FLUX's QKV (and ``linear1``) the way
kohya, XLabs and BFL store them: the down matrices stacked, the up matrices block-diagonal, so the
file means exactly the same update. The maps here are written independently of diffc's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 8.0


@dataclasses.dataclass
class RandomLora:
    """``pairs[module] = (down (r, in), up (out, r))`` in diffusers names; every module's scale is ``scale``."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int = RANK
    alpha: float = ALPHA

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def expected(self, weights: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """What a merge at ``strength`` must give for every touched weight (float64 reference)."""
        out = {}
        for module, (down, up) in self.pairs.items():
            w = weights[f"{module}.weight"].double()
            out[f"{module}.weight"] = w + strength * self.scale * (up.double() @ down.double())
        return out


def random_lora(model: torch.nn.Module, modules: list[str], seed: int, rank: int = RANK,
                alpha: float = ALPHA, magnitude: float = 0.15) -> RandomLora:
    g = torch.Generator().manual_seed(seed)
    linears = dict(model.named_modules())
    pairs = {}
    for name in modules:
        w = linears[name].weight
        down = torch.randn(rank, w.shape[1], generator=g) * magnitude
        up = torch.randn(w.shape[0], rank, generator=g) * magnitude
        pairs[name] = (down, up)
    return RandomLora(pairs, rank, alpha)


def linear_modules(model: torch.nn.Module, include=lambda name: True) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and include(n)]


# ---- diffusers / PEFT -------------------------------------------------------------------------------
def write_diffusers(lora: RandomLora, path: Path, pipeline_cls) -> Path:
    """Through diffusers' own ``save_lora_weights``, with the PEFT config (r, lora_alpha) as metadata."""
    from peft import LoraConfig

    layers = {}
    for module, (down, up) in lora.pairs.items():
        layers[f"{module}.lora_A.weight"] = down.contiguous()
        layers[f"{module}.lora_B.weight"] = up.contiguous()
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=sorted(lora.pairs)).to_dict()
    path.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(str(path), transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=json.loads(json.dumps(config, default=list)))
    return path / "pytorch_lora_weights.safetensors"


def write_keys(tensors: dict[str, torch.Tensor], path: Path, adapter_metadata: dict | None = None) -> Path:
    """``tensors`` as they are; ``adapter_metadata`` (any JSON) stored as diffusers does, under ``lora_adapter_metadata``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = None if adapter_metadata is None else {"lora_adapter_metadata": json.dumps(adapter_metadata)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def diffusers_with_alpha_keys(lora: RandomLora, down="lora_A", up="lora_B") -> dict[str, torch.Tensor]:
    out = {}
    for module, (d, u) in lora.pairs.items():
        out[f"transformer.{module}.{down}.weight"] = d
        out[f"transformer.{module}.{up}.weight"] = u
        out[f"transformer.{module}.alpha"] = torch.tensor(lora.alpha)
    return out


def write_kohya_diffusers_names(lora: RandomLora, path: Path) -> Path:
    """kohya's ``lora_transformer_<diffusers name with underscores>`` layout."""
    tensors = {}
    for module, (d, u) in lora.pairs.items():
        stem = "lora_transformer_" + module.replace(".", "_")
        tensors.update({f"{stem}.lora_down.weight": d, f"{stem}.lora_up.weight": u,
                        f"{stem}.alpha": torch.tensor(lora.alpha)})
    return write_keys(tensors, path)


# ---- FLUX: BFL / kohya / ComfyUI / XLabs --------------------------------------------------------------
def flux_bfl_names(layers: int, single_layers: int) -> dict[str, list[str]]:
    """BFL module name -> the diffusers modules it fuses (rows in this order)."""
    names: dict[str, list[str]] = {}
    for i in range(layers):
        d = f"transformer_blocks.{i}"
        names.update({
            f"double_blocks.{i}.img_attn.qkv": [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"],
            f"double_blocks.{i}.txt_attn.qkv": [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
            f"double_blocks.{i}.img_attn.proj": [f"{d}.attn.to_out.0"],
            f"double_blocks.{i}.txt_attn.proj": [f"{d}.attn.to_add_out"],
            f"double_blocks.{i}.img_mlp.0": [f"{d}.ff.net.0.proj"], f"double_blocks.{i}.img_mlp.2": [f"{d}.ff.net.2"],
            f"double_blocks.{i}.txt_mlp.0": [f"{d}.ff_context.net.0.proj"],
            f"double_blocks.{i}.txt_mlp.2": [f"{d}.ff_context.net.2"],
            f"double_blocks.{i}.img_mod.lin": [f"{d}.norm1.linear"],
            f"double_blocks.{i}.txt_mod.lin": [f"{d}.norm1_context.linear"],
        })
    for i in range(single_layers):
        s = f"single_transformer_blocks.{i}"
        names.update({
            f"single_blocks.{i}.linear1": [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"],
            f"single_blocks.{i}.linear2": [f"{s}.proj_out"],
            f"single_blocks.{i}.modulation.lin": [f"{s}.norm.linear"],
        })
    names.update({"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
                  "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
                  "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
                  "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
                  "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
                  "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
                  "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"]})
    return names


def fuse(lora: RandomLora, parts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stacked downs and a block-diagonal up: the one LoRA of the fused module that equals the parts'."""
    if not all(p in lora.pairs for p in parts):
        return None
    downs = [lora.pairs[p][0] for p in parts]
    ups = [lora.pairs[p][1] for p in parts]
    return torch.cat(downs), torch.block_diag(*ups)


def flux_fused(lora: RandomLora, layers: int, single_layers: int, swap_final: bool = True):
    """BFL name -> (down, up, rank) for every fused or renamed module the adapter fully covers."""
    out = {}
    for bfl, parts in flux_bfl_names(layers, single_layers).items():
        fused = fuse(lora, parts)
        if fused is not None:
            out[bfl] = fused
    if swap_final and "norm_out.linear" in lora.pairs:  # BFL's final modulation is (shift, scale)
        down, up = lora.pairs["norm_out.linear"]
        half = up.shape[0] // 2
        out["final_layer.adaLN_modulation.1"] = (down, torch.cat([up[half:], up[:half]]))
    return out


def write_flux_kohya(lora, layers, single_layers, path: Path, prefix="lora_unet_", underscore=True) -> Path:
    tensors = {}
    for bfl, (down, up) in flux_fused(lora, layers, single_layers).items():
        stem = prefix + (bfl.replace(".", "_") if underscore else bfl)
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(lora.scale * down.shape[0])  # same alpha / rank as the parts
    return write_keys(tensors, path)


def write_flux_bfl(lora, layers, single_layers, path: Path, norms: dict[str, torch.Tensor] | None = None) -> Path:
    tensors = {}
    for bfl, (down, up) in flux_fused(lora, layers, single_layers).items():
        tensors[f"{bfl}.lora_A.weight"] = down
        tensors[f"{bfl}.lora_B.weight"] = up * lora.scale  # BFL files carry no alpha
    tensors.update(norms or {})
    return write_keys(tensors, path)


def write_flux_xlabs(lora, layers, single_layers, path: Path) -> Path:
    tensors = {}
    for i in range(layers):
        d = f"transformer_blocks.{i}"
        for name, parts in ((f"double_blocks.{i}.processor.qkv_lora1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"]),
                            (f"double_blocks.{i}.processor.qkv_lora2",
                             [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"]),
                            (f"double_blocks.{i}.processor.proj_lora1", [f"{d}.attn.to_out.0"]),
                            (f"double_blocks.{i}.processor.proj_lora2", [f"{d}.attn.to_add_out"])):
            fused = fuse(lora, parts)
            if fused is not None:
                tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = fused[0], fused[1] * lora.scale
    for i in range(single_layers):
        s = f"single_transformer_blocks.{i}"
        for name, parts in ((f"single_blocks.{i}.processor.qkv_lora", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"]),
                            (f"single_blocks.{i}.processor.proj_lora", [f"{s}.proj_out"])):
            fused = fuse(lora, parts)
            if fused is not None:
                tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = fused[0], fused[1] * lora.scale
    return write_keys(tensors, path)


XLABS_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "proj_out")


def xlabs_covers(module: str) -> bool:
    return module.startswith(("transformer_blocks.", "single_transformer_blocks.")) and module.endswith(XLABS_MODULES)


# ---- Wan: original names / musubi -------------------------------------------------------------------
WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                "ffn.net.2": "ffn.2"}


def wan_original_name(module: str) -> str:
    _, i, rest = module.split(".", 2)
    return f"blocks.{i}.{WAN_ORIGINAL[rest]}"


def write_wan_original(lora, path: Path, down="lora_down", up="lora_up", alpha=True, prefix="diffusion_model.",
                       underscore=False) -> Path:
    tensors = {}
    for module, (d, u) in lora.pairs.items():
        name = wan_original_name(module)
        stem = prefix + (name.replace(".", "_") if underscore else name)
        tensors[f"{stem}.{down}.weight"] = d
        tensors[f"{stem}.{up}.weight"] = u if alpha else u * lora.scale
        if alpha:
            tensors[f"{stem}.alpha"] = torch.tensor(lora.alpha)
    return write_keys(tensors, path)
