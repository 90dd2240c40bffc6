"""Tiny random Z-Image pipelines saved with diffusers' own classes (Qwen tokenizer trained locally)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from diffc.demo.qwen_tokenizer import train_qwen_tokenizer


@dataclasses.dataclass(frozen=True)
class TinyZImage:
    """Production Z-Image-Turbo: dim 3840, 30 heads (head dim 128), 30 layers + 2+2 refiners, axes (32, 48, 48),
    Qwen3-4B (hidden 2560) captions, FLUX's VAE (16 latent channels)."""

    name: str
    dim: int = 32
    heads: int = 2
    layers: int = 2
    refiners: int = 1
    axes: tuple[int, int, int] = (4, 6, 6)
    latent_channels: int = 4
    vae_blocks: tuple[int, ...] = (8, 16)
    text_dim: int = 24
    kv_heads: int | None = None  # config.json's n_kv_heads (None: n_heads); diffusers' attention does not read it
    axes_lens: tuple[int, int, int] = (1024, 64, 64)
    patches: tuple[tuple[int, int], ...] = ((2, 1),)  # (all_patch_size, all_f_patch_size) pairs


ZIMAGE_VARIANTS = {
    "tiny": TinyZImage("tiny"),
    "odd": TinyZImage("odd", dim=24, heads=1, layers=1, refiners=2, axes=(8, 8, 8), latent_channels=3,
                      vae_blocks=(8,), text_dim=20),
    # a caption axis too short for diffusers' default 512 text tokens (236 fit); n_kv_heads=1, which the config
    # carries and diffusers' Z-Image attention ignores (n_heads K/V heads)
    "short-captions": TinyZImage("short-captions", dim=32, heads=2, kv_heads=1, axes_lens=(300, 64, 64)),
    # an embedder per patch pair, (1, 1) first: ZImagePipeline runs the (2, 1) one
    "two-patches": TinyZImage("two-patches", layers=1, patches=((1, 1), (2, 1))),
}


def build_zimage_pipeline(v: TinyZImage, tok_dir: Path, seed: int = 0):
    import diffusers
    import transformers

    tokenizer = train_qwen_tokenizer(tok_dir)
    torch.manual_seed(seed)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=tuple(p for p, _ in v.patches), all_f_patch_size=tuple(f for _, f in v.patches),
        in_channels=v.latent_channels, dim=v.dim, n_layers=v.layers,
        n_refiner_layers=v.refiners, n_heads=v.heads, n_kv_heads=v.kv_heads or v.heads, cap_feat_dim=v.text_dim,
        axes_dims=list(v.axes), axes_lens=list(v.axes_lens))
    with torch.no_grad():  # diffusers initialises the pad tokens to zero; random ones make the test see them
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(v.vae_blocks),
        up_block_types=["UpDecoderBlock2D"] * len(v.vae_blocks), block_out_channels=list(v.vae_blocks),
        layers_per_block=1, latent_channels=v.latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = transformers.Qwen3Model(transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=v.text_dim, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                          use_dynamic_shifting=False)
    return diffusers.ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    transformer=transformer)


def save_zimage(root: Path, variant: str = "tiny") -> Path:
    pipe = build_zimage_pipeline(ZIMAGE_VARIANTS[variant], root / "tok")
    pipe.save_pretrained(root / "ckpt", safe_serialization=True)
    index = json.loads((root / "ckpt" / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    return root / "ckpt"
