"""Tiny random Wan2.1 pipelines saved with diffusers' ``WanPipeline(...).save_pretrained`` (the exact layout)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class TinyWan:
    """A tiny Wan2.1 T2V variant. Production Wan2.1-T2V-1.3B: 30 layers, 12 heads of 128, ffn 8960, text_dim 4096
    (UMT5-XXL), patch (1, 2, 2); 14B: 40 layers, 40 heads of 128, ffn 13824. VAE: base_dim 96, z_dim 16,
    dim_mult (1, 2, 4, 4), 8x spatial and 4x temporal compression."""

    name: str
    heads: int = 2
    head_dim: int = 12
    layers: int = 2
    ffn_dim: int = 37
    patch: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 32  # UMT5 d_model = the DiT's text_dim
    vae_base_dim: int = 4
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    flow_shift: float = 3.0

    @property
    def spatial(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal(self) -> int:
        return 2 ** sum(self.temporal_downsample)


WAN_VARIANTS = {
    # Wan2.1's VAE compression (8x, 4x), 16 latent channels: sizes are multiples of 16, frames 4k+1
    "base": TinyWan("base"),
    # 3 heads of 8, one layer, 4x spatial / 2x temporal VAE with 4 latent channels: multiples of 8, frames 2k+1
    "odd-heads": TinyWan("odd-heads", heads=3, head_dim=8, layers=1, ffn_dim=20, text_dim=24, vae_base_dim=6, z_dim=4,
                         dim_mult=(1, 2, 2), temporal_downsample=(False, True), flow_shift=5.0),
    # non-square patch (1, 1, 2): height a multiple of 8, width of 16; Wan's diffusers-test VAE (dim_mult all 1)
    "wide-patch": TinyWan("wide-patch", heads=1, head_dim=16, layers=2, ffn_dim=24, patch=(1, 1, 2), text_dim=16,
                          vae_base_dim=3, z_dim=8, dim_mult=(1, 1, 1, 1)),
}


def _latent_stats(z_dim: int) -> tuple[list[float], list[float]]:
    gen = torch.Generator().manual_seed(z_dim)
    mean = (torch.rand(z_dim, generator=gen) - 0.5).tolist()
    std = (torch.rand(z_dim, generator=gen) * 2 + 0.5).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def build_wan_pipeline(v: TinyWan, tok_dir: Path, seed: int = 0):
    import diffusers
    import transformers

    from diffc.demo.tokenizers import train_t5_tokenizer

    tokenizer = train_t5_tokenizer(tok_dir)
    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=v.patch, num_attention_heads=v.heads, attention_head_dim=v.head_dim, in_channels=v.z_dim,
        out_channels=v.z_dim, text_dim=v.text_dim, freq_dim=16, ffn_dim=v.ffn_dim, num_layers=v.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    mean, std = _latent_stats(v.z_dim)
    vae = diffusers.AutoencoderKLWan(
        base_dim=v.vae_base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult), num_res_blocks=1,
        temperal_downsample=list(v.temporal_downsample), latents_mean=mean, latents_std=std,
        scale_factor_spatial=v.spatial, scale_factor_temporal=v.temporal)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tokenizer), d_model=v.text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=v.flow_shift, solver_order=2,
        solver_type="bh2", lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="zero")
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer)


@pytest.fixture(scope="session")
def wan_checkpoint(tmp_path_factory):
    """Factory: ``wan_checkpoint(variant) -> Path`` of a saved tiny WanPipeline, cached for the session."""
    cache: dict[str, Path] = {}

    def make(variant: str = "base") -> Path:
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"wan-{variant}")
            pipe = build_wan_pipeline(WAN_VARIANTS[variant], root / "tok")
            pipe.save_pretrained(root / "ckpt", safe_serialization=True)
            cache[variant] = root / "ckpt"
        return cache[variant]

    return make


IMAGE_DIM = 20  # the tiny CLIP vision tower's width (Wan2.1 I2V: ViT-H/14, 1280)
IMAGE_TOKENS = 17  # its tokens a 32x32 image: 4x4 patches of 8 and the class token (ViT-H/14 at 224: 257)


def _wan_transformer(v: TinyWan, seed: int, **overrides):
    import diffusers

    torch.manual_seed(seed)
    kwargs = dict(patch_size=v.patch, num_attention_heads=v.heads, attention_head_dim=v.head_dim,
                  in_channels=v.z_dim, out_channels=v.z_dim, text_dim=v.text_dim, freq_dim=16, ffn_dim=v.ffn_dim,
                  num_layers=v.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    return diffusers.WanTransformer3DModel(**{**kwargs, **overrides})


def build_wan_variant(kind: str, tok_dir: Path):
    """Tiny Wan2.2 / image-to-video pipelines on the ``base`` variant's sizes, saved as published:
    ``t2v-a14b`` (two experts, WanPipeline), ``i2v`` (Wan2.1 I2V: CLIP vision tower and image
    cross-attention, WanImageToVideoPipeline), ``flf2v`` (``i2v`` whose DiT reads a first and a last frame),
    ``i2v-a14b`` (two experts, no image encoder), ``ti2v``
    (``expand_timesteps``: text- and image-to-video in one WanPipeline). A ``-odd`` suffix builds the kind on the
    ``odd-heads`` variant's sizes instead (a VAE of 2x temporal compression, 4 latent channels)."""
    import diffusers
    import transformers

    v = WAN_VARIANTS["odd-heads" if kind.endswith("-odd") else "base"]
    kind = kind.removesuffix("-odd")
    base = build_wan_pipeline(v, tok_dir)
    parts = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler)
    if kind == "ti2v":  # Wan2.2 TI2V's per-token timesteps and first-frame latents (here with a Wan2.1-style VAE)
        return diffusers.WanPipeline(**parts, transformer=_wan_transformer(v, 1), expand_timesteps=True)
    if kind == "ti2v-5b":  # ... and with the Wan2.2 VAE: residual stages, 2x2 patchify, 12 channels in and out
        torch.manual_seed(4)
        z = 8
        mean, std = _latent_stats(z)
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, decoder_base_dim=12, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
            latents_mean=mean, latents_std=std, scale_factor_spatial=8, scale_factor_temporal=2)
        transformer = _wan_transformer(v, 1, in_channels=z, out_channels=z)
        return diffusers.WanPipeline(**{**parts, "vae": vae}, transformer=transformer, expand_timesteps=True)
    if kind == "t2v-a14b":
        return diffusers.WanPipeline(**parts, transformer=_wan_transformer(v, 1), transformer_2=_wan_transformer(v, 2),
                                     boundary_ratio=0.875)
    channels = 2 * v.z_dim + v.temporal
    if kind == "i2v-a14b":
        return diffusers.WanImageToVideoPipeline(
            **parts, transformer=_wan_transformer(v, 1, in_channels=channels),
            transformer_2=_wan_transformer(v, 2, in_channels=channels), boundary_ratio=0.9)
    assert kind in ("i2v", "flf2v"), kind
    torch.manual_seed(3)
    encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=IMAGE_DIM))
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    inner = v.heads * v.head_dim
    # flf2v (Wan2.1 FLF2V): the DiT pairs the first and last frames' CLIP tokens (17 each here, 257 in production)
    pairs = {"pos_embed_seq_len": 2 * IMAGE_TOKENS} if kind == "flf2v" else {}
    transformer = _wan_transformer(v, 1, in_channels=channels, image_dim=IMAGE_DIM, added_kv_proj_dim=inner, **pairs)
    return diffusers.WanImageToVideoPipeline(**parts, transformer=transformer, image_encoder=encoder,
                                             image_processor=processor)


def save_wan_variant(kind: str, root: Path) -> Path:
    """Save the tiny pipeline of :func:`build_wan_variant` under ``root`` as published; its checkpoint folder."""
    build_wan_variant(kind, root / "tok").save_pretrained(root / "ckpt", safe_serialization=True)
    index_path = root / "ckpt" / "model_index.json"
    index = json.loads(index_path.read_text())
    if index.get("image_processor", [None])[0]:  # the class name the published checkpoints carry
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index))
    return root / "ckpt"


@pytest.fixture(scope="session")
def wan22_checkpoint(tmp_path_factory):
    """Factory: ``wan22_checkpoint(kind) -> Path`` of a saved tiny pipeline of :func:`build_wan_variant`."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = save_wan_variant(kind, tmp_path_factory.mktemp(f"wan-{kind}"))
        return cache[kind]

    return make
