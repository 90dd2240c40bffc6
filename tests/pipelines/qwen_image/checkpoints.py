"""Tiny random Qwen-Image / -Edit / -Edit-2509 pipelines saved with diffusers' own ``save_pretrained``.

Production Qwen-Image: 60 blocks, 24 heads of 128, Qwen2.5-VL-7B (hidden 3584, 28 layers), VAE base_dim 96
with 16 latent channels. Here: 2 blocks, 2 heads of 16, a 2-layer Qwen2.5-VL of width 32 with a 2-layer
vision tower, a VAE of base_dim 4 (8x spatial, 16 latent channels).
"""

from __future__ import annotations

from pathlib import Path

import torch

PIPELINES = {"t2i": "QwenImagePipeline", "edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}
TEXT_DIM = 32
# the vision processor's pixel budget: a few vision tokens per image keep the CPU tests fast
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


def _latent_stats(z_dim: int) -> tuple[list[float], list[float]]:
    gen = torch.Generator().manual_seed(z_dim)
    mean = (torch.rand(z_dim, generator=gen) - 0.5).tolist()
    std = (torch.rand(z_dim, generator=gen) * 2 + 0.5).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def build_components(tok_dir: Path, seed: int = 0) -> dict:
    import diffusers
    import transformers

    from diffc.demo.qwen_tokenizer import special_token_ids, train_qwen2_tokenizer

    tokenizer = train_qwen2_tokenizer(tok_dir)
    torch.manual_seed(seed)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    mean, std = _latent_stats(16)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                           temperal_downsample=[False, True, True], latents_mean=mean,
                                           latents_std=std)
    config = transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": TEXT_DIM, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "max_position_embeddings": 4096},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": TEXT_DIM, "fullatt_block_indexes": [1], "window_size": 56},
        hidden_size=TEXT_DIM, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
        **special_token_ids(tokenizer))
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def vl_processor(tokenizer):
    """transformers' own ``Qwen2VLProcessor`` (its ``__call__`` is the oracle of diffc's token expansion), built
    around the PIL image processor: its constructor insists on a torchvision video processor, so the instance is
    assembled without it (no video is ever passed)."""
    import transformers

    cls = transformers.Qwen2VLProcessor
    proc = cls.__new__(cls)
    proc.image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    proc.tokenizer, proc.video_processor, proc.chat_template = tokenizer, None, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


def build_pipeline(kind: str, components: dict):
    import diffusers

    cls = getattr(diffusers, PIPELINES[kind])
    if kind == "t2i":
        return cls(**components)
    return cls(**components, processor=vl_processor(components["tokenizer"]))


def save_checkpoint(kind: str, components: dict, path: Path) -> Path:
    """The published layout: the T2I pipeline saved by diffusers; the edit pipelines add ``processor/`` (the
    Qwen2-VL image processor config + tokenizer) and name their class in model_index.json."""
    import json

    from diffc.demo.qwen_tokenizer import write_vl_processor

    build_pipeline("t2i", components).save_pretrained(path, safe_serialization=True)
    if kind != "t2i":
        index = json.loads((path / "model_index.json").read_text())
        index["_class_name"] = PIPELINES[kind]
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        write_vl_processor(path / "processor", components["tokenizer"], MIN_PIXELS, MAX_PIXELS)
    return path
