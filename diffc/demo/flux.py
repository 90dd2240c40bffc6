"""The FLUX demo: FLUX.1-dev's architecture and file layout at a tiny size, with random weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .tokenizers import train_clip_tokenizer, train_t5_tokenizer
from .writer import save_native, write_json, write_model_index

TEXT_DIM = 32   # T5 d_model -> joint_attention_dim
CLIP_DIM = 32   # CLIP hidden size -> pooled_projection_dim

# FLUX.1-dev's scheduler_config.json.
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                  "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}


def build_flux_demo(root: Path) -> None:
    import transformers

    from ..models.autoencoder_kl import AUTOENCODER_KL_SPECS, AutoencoderKL
    from ..models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        # The VAE keeps FLUX's 8x downsampling and 16 latent channels, at a fraction of the width.
        vae_cfg = dataclasses.replace(AUTOENCODER_KL_SPECS["flux"], block_out_channels=(8, 16, 32, 32),
                                      layers_per_block=1, norm_num_groups=4, sample_size=256)
        dit_cfg = dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], in_channels=vae_cfg.latent_channels * 4,
                                      joint_attention_dim=TEXT_DIM, pooled_projection_dim=CLIP_DIM)
        save_native(root / "transformer", "FluxTransformer2DModel", FluxTransformer2DModel(dit_cfg))
        save_native(root / "vae", "AutoencoderKL", AutoencoderKL(vae_cfg))
        clip_tok = train_clip_tokenizer(root / "tokenizer")
        t5_tok = train_t5_tokenizer(root / "tokenizer_2")
        transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=CLIP_DIM)).save_pretrained(root / "text_encoder")
        transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "text_encoder_2")
    write_json(root / "scheduler" / "scheduler_config.json", FLUX_SCHEDULER)
    write_model_index(root, "FluxPipeline", {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel"), "tokenizer_2": ("transformers", "T5Tokenizer"),
        "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
    })
    (root / "README.txt").write_text("diffc demo checkpoint: FLUX.1 architecture, tiny, RANDOM weights. "
                                     "Its images are noise.\n")
