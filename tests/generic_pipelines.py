"""Tiny random pipelines of classes diffc has no native spec for, saved with diffusers' ``save_pretrained``:
SD3 (image), HunyuanVideo, LTX-Video and CogVideoX (video). Tokenizers are trained locally.

Production sizes, for scale: SD3.5-Large 38 joint blocks of 38 heads x 64, CLIP-L + CLIP-G + T5-XXL;
HunyuanVideo 20 double + 40 single blocks of 24 heads x 128, Llama-3-8B + CLIP-L; LTX-Video 28 blocks
of 32 heads x 64, T5-XXL; CogVideoX-5B 42 blocks of 48 heads x 64, T5-XXL.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small requests each tiny pipeline runs in well under a second on CPU.
REQUESTS = {
    "sd3": dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16),
    "hunyuan": dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16),
    "ltx": dict(height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16),
    "cogvideox": dict(height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16),
}


def _clip(tok, hidden: int, projection: bool):
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _t5(tok, d_model: int):
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_sd3(tok_dir: Path):
    import diffusers

    from diffc.demo.tokenizers import train_clip_tokenizer, train_t5_tokenizer

    clip_tok, t5_tok = train_clip_tokenizer(tok_dir / "clip"), train_t5_tokenizer(tok_dir / "t5")
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        qk_norm="rms_norm", pos_embed_max_size=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(clip_tok, 16, True), tokenizer=clip_tok, text_encoder_2=_clip(clip_tok, 16, True),
        tokenizer_2=clip_tok, text_encoder_3=_t5(t5_tok, 32), tokenizer_3=t5_tok)


def build_hunyuan(tok_dir: Path):
    import diffusers
    import transformers

    from diffc.demo.tokenizers import train_clip_tokenizer, train_llama_tokenizer

    llama_tok, clip_tok = train_llama_tokenizer(tok_dir / "llama"), train_clip_tokenizer(tok_dir / "clip")
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=llama_tok.pad_token_id))
    return diffusers.HunyuanVideoPipeline(
        transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=llama, tokenizer=llama_tok, text_encoder_2=_clip(clip_tok, 8, False), tokenizer_2=clip_tok)


def build_ltx(tok_dir: Path):
    import diffusers

    from diffc.demo.tokenizers import train_t5_tokenizer

    t5_tok = train_t5_tokenizer(tok_dir / "t5")
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=32)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    return diffusers.LTXPipeline(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                 text_encoder=_t5(t5_tok, 32), tokenizer=t5_tok)


def build_cogvideox(tok_dir: Path):
    import diffusers

    from diffc.demo.tokenizers import train_t5_tokenizer

    t5_tok = train_t5_tokenizer(tok_dir / "t5")
    torch.manual_seed(0)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return diffusers.CogVideoXPipeline(transformer=transformer, vae=vae, scheduler=diffusers.CogVideoXDDIMScheduler(),
                                       text_encoder=_t5(t5_tok, 32), tokenizer=t5_tok)


BUILDERS = {"sd3": build_sd3, "hunyuan": build_hunyuan, "ltx": build_ltx, "cogvideox": build_cogvideox}
