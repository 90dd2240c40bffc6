"""The LoRA formats of each model family, as name maps (see :mod:`diffc.lora.naming`).

FLUX.1: BFL's original module names (kohya sd-scripts and ComfyUI LoRAs use them, with
``lora_unet_``/``diffusion_model.`` prefixes; BFL's own LoRAs add ``.scale`` norm weights) and XLabs'
attention-processor names. Wan: the original Wan names (``diffusion_model.blocks.N.self_attn.q``, also
musubi-tuner's ``lora_unet_blocks_N_self_attn_q``). diffusers/PEFT names are diffc's own and need no map.
"""

from __future__ import annotations

from .naming import Map, Naming

_D = "transformer_blocks.{d}"
_S = "single_transformer_blocks.{s}"

FLUX_BFL = (
    Map("double_blocks.{d}.img_attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v")),
    Map("double_blocks.{d}.img_attn.proj", (f"{_D}.attn.to_out.0",)),
    Map("double_blocks.{d}.img_mlp.0", (f"{_D}.ff.net.0.proj",)),
    Map("double_blocks.{d}.img_mlp.2", (f"{_D}.ff.net.2",)),
    Map("double_blocks.{d}.img_mod.lin", (f"{_D}.norm1.linear",)),
    Map("double_blocks.{d}.txt_attn.qkv", (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj")),
    Map("double_blocks.{d}.txt_attn.proj", (f"{_D}.attn.to_add_out",)),
    Map("double_blocks.{d}.txt_mlp.0", (f"{_D}.ff_context.net.0.proj",)),
    Map("double_blocks.{d}.txt_mlp.2", (f"{_D}.ff_context.net.2",)),
    Map("double_blocks.{d}.txt_mod.lin", (f"{_D}.norm1_context.linear",)),
    Map("double_blocks.{d}.img_attn.norm.query_norm", (f"{_D}.attn.norm_q",)),
    Map("double_blocks.{d}.img_attn.norm.key_norm", (f"{_D}.attn.norm_k",)),
    Map("double_blocks.{d}.txt_attn.norm.query_norm", (f"{_D}.attn.norm_added_q",)),
    Map("double_blocks.{d}.txt_attn.norm.key_norm", (f"{_D}.attn.norm_added_k",)),
    Map("single_blocks.{s}.linear1", (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp")),
    Map("single_blocks.{s}.linear2", (f"{_S}.proj_out",)),
    Map("single_blocks.{s}.modulation.lin", (f"{_S}.norm.linear",)),
    Map("single_blocks.{s}.norm.query_norm", (f"{_S}.attn.norm_q",)),
    Map("single_blocks.{s}.norm.key_norm", (f"{_S}.attn.norm_k",)),
    Map("img_in", ("x_embedder",)),
    Map("txt_in", ("context_embedder",)),
    Map("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Map("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Map("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Map("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Map("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Map("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Map("final_layer.linear", ("proj_out",)),
    Map("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)

FLUX_XLABS = (
    Map("double_blocks.{d}.processor.qkv_lora1", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v")),
    Map("double_blocks.{d}.processor.proj_lora1", (f"{_D}.attn.to_out.0",)),
    Map("double_blocks.{d}.processor.qkv_lora2",
        (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj")),
    Map("double_blocks.{d}.processor.proj_lora2", (f"{_D}.attn.to_add_out",)),
    Map("single_blocks.{s}.processor.qkv_lora", (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v")),
    Map("single_blocks.{s}.processor.proj_lora", (f"{_S}.proj_out",)),
)

FLUX_NAMING = Naming(blocks={"d": "transformer_blocks", "s": "single_transformer_blocks"},
                     schemes={"bfl": FLUX_BFL, "xlabs": FLUX_XLABS})

_B = "blocks.{b}"
_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))

WAN_ORIGINAL = (
    *(Map(f"{_B}.self_attn.{o}", (f"{_B}.attn1.{c}",)) for o, c in _ATTN),
    *(Map(f"{_B}.cross_attn.{o}", (f"{_B}.attn2.{c}",)) for o, c in _ATTN),
    Map(f"{_B}.cross_attn.k_img", (f"{_B}.attn2.add_k_proj",)),
    Map(f"{_B}.cross_attn.v_img", (f"{_B}.attn2.add_v_proj",)),
    Map(f"{_B}.cross_attn.norm_k_img", (f"{_B}.attn2.norm_added_k",)),
    Map(f"{_B}.ffn.0", (f"{_B}.ffn.net.0.proj",)),
    Map(f"{_B}.ffn.2", (f"{_B}.ffn.net.2",)),
    Map(f"{_B}.norm3", (f"{_B}.norm2",)),
    Map(f"{_B}.modulation", (f"{_B}.scale_shift_table",)),
    Map("head.head", ("proj_out",)),
    Map("head.modulation", ("scale_shift_table",)),
    Map("patch_embedding", ("patch_embedding",)),
    Map("time_projection.1", ("condition_embedder.time_proj",)),
    Map("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Map("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Map("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Map("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Map("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Map("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
)

WAN_NAMING = Naming(blocks={"b": "blocks"}, schemes={"wan": WAN_ORIGINAL})

# Native model class -> its formats. A class missing here still takes diffusers/PEFT-named LoRAs.
NAMINGS = {"FluxTransformer2DModel": FLUX_NAMING, "WanTransformer3DModel": WAN_NAMING}
