"""The Wan demo: Wan2.1-T2V's architecture and file layout at a tiny size, with random weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .tokenizers import train_t5_tokenizer
from .writer import save_native, write_json, write_model_index

TEXT_DIM = 32  # UMT5 d_model -> the DiT's text_dim


def build_wan_demo(root: Path) -> None:
    import transformers

    from ..models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
    from ..models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan
    from ..pipelines.schedulers.unipc import SCHEDULER_CONFIGS

    with torch.random.fork_rng():
        torch.manual_seed(0)
        # The VAE keeps Wan2.1's 8x spatial / 4x temporal compression and 16 latent channels.
        vae_cfg = WAN_VAE_SPECS["tiny"]
        dit_cfg = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], in_channels=vae_cfg.z_dim,
                                      out_channels=vae_cfg.z_dim, text_dim=TEXT_DIM)
        save_native(root / "transformer", "WanTransformer3DModel", WanTransformer3DModel(dit_cfg))
        save_native(root / "vae", "AutoencoderKLWan", AutoencoderKLWan(vae_cfg))
        tokenizer = train_t5_tokenizer(root / "tokenizer")
        transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "text_encoder")
    # Wan2.1-T2V's scheduler_config.json (UniPC, flow prediction, flow_shift 3.0 for 480p).
    write_json(root / "scheduler" / "scheduler_config.json",
               {"_class_name": "UniPCMultistepScheduler", **SCHEDULER_CONFIGS["wan2.1-480p"]})
    write_model_index(root, "WanPipeline", {
        "scheduler": ("diffusers", "UniPCMultistepScheduler"),
        "text_encoder": ("transformers", "UMT5EncoderModel"), "tokenizer": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "WanTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLWan"),
    })
    (root / "README.txt").write_text("diffc demo checkpoint: Wan2.1 T2V architecture, tiny, RANDOM weights. "
                                     "Its videos are noise.\n")


IMAGE_DIM = 32  # the tiny CLIP vision tower's width (Wan2.1 I2V: ViT-H/14, 1280)
IMAGE_TOKENS = 17  # its tokens per image: (32 / 8)² patches and the class token


def build_wan_i2v_demo(root: Path, last_frame: bool = False) -> None:
    """Wan2.1-I2V's architecture and layout, tiny: the T2V demo's text encoder, VAE and scheduler, a DiT with
    36 input channels (latents, first-frame mask, first-frame latents) and image cross-attention, and a
    CLIP vision tower with its image processor. ``last_frame``: Wan2.1-FLF2V's instead, whose DiT pairs a first and
    a last frame's CLIP tokens (``pos_embed_seq_len``), so it needs both."""
    import transformers

    from ..models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
    from ..models.wan.vae import WAN_VAE_SPECS

    build_wan_demo(root)
    vae_cfg = WAN_VAE_SPECS["tiny"]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        base = WAN_TRANSFORMER_SPECS["tiny"]
        dit_cfg = dataclasses.replace(base, in_channels=2 * vae_cfg.z_dim + 4, out_channels=vae_cfg.z_dim,
                                      text_dim=TEXT_DIM, image_dim=IMAGE_DIM,
                                      added_kv_proj_dim=base.num_attention_heads * base.attention_head_dim,
                                      pos_embed_seq_len=2 * IMAGE_TOKENS if last_frame else None)
        save_native(root / "transformer", "WanTransformer3DModel", WanTransformer3DModel(dit_cfg))
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=IMAGE_DIM, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=IMAGE_DIM)).save_pretrained(root / "image_encoder")
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(root / "image_processor")
    write_model_index(root, "WanImageToVideoPipeline", {
        "scheduler": ("diffusers", "UniPCMultistepScheduler"),
        "text_encoder": ("transformers", "UMT5EncoderModel"), "tokenizer": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "WanTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLWan"),
        "image_encoder": ("transformers", "CLIPVisionModel"), "image_processor": ("transformers", "CLIPImageProcessor"),
    })
    kind = "FLF2V (first and last frame)" if last_frame else "I2V"
    (root / "README.txt").write_text(f"diffc demo checkpoint: Wan2.1 {kind} architecture, tiny, RANDOM weights. "
                                     "Its videos are noise.\n")


def build_wan_flf2v_demo(root: Path) -> None:
    """:func:`build_wan_i2v_demo` with a last frame: Wan2.1-FLF2V's layout (``--image FIRST --last-image LAST``)."""
    build_wan_i2v_demo(root, last_frame=True)

