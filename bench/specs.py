"""Named benchmark workloads: a model at its published size, its pipeline parts and the default request.

Each entry is data. The transformer and VAE configs are diffc's named specs (their field names are the
diffusers config.json names, so the same dict builds the diffusers model). Text encoders are given as
transformers config kwargs; tokenizers are trained locally (the real ones cannot be downloaded), which
only changes which token ids a prompt maps to, not any model size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffc.demo.flux import FLUX_SCHEDULER
from diffc.models.autoencoder_kl import AUTOENCODER_KL_SPECS
from diffc.models.config import ModelConfig
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS
from diffc.models.wan.vae import WAN_VAE_SPECS
from diffc.models.qwen_image.transformer import QWEN_IMAGE_TRANSFORMER_SPECS
from diffc.models.qwen_image.vae import QWEN_IMAGE_VAE_SPECS
from diffc.models.zimage.transformer import ZIMAGE_TRANSFORMER_SPECS
from diffc.pipelines.schedulers.unipc import SCHEDULER_CONFIGS


class DiffusersConfig:
    """A model config given as the diffusers ``config.json`` dict, for models diffc runs on the generic
    (diffusers) backend; fields read as attributes, like a native ``ModelConfig``."""

    def __init__(self, **config: Any):
        self._config = dict(config)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_config"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> "DiffusersConfig":
        return DiffusersConfig(**{**self._config, **changes})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._config.items()}


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder and its tokenizer, as components of the pipeline directory."""

    component: str  # "text_encoder", "text_encoder_2"
    model_class: str  # transformers class: CLIPTextModel, T5EncoderModel, UMT5EncoderModel
    config_class: str  # transformers config class
    config: dict[str, Any]
    tokenizer_component: str
    tokenizer_kind: str  # "clip", "t5", "llama" or "qwen2": which diffc.demo tokenizer trainer makes it


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """A benchmark workload: the pipeline's parts at a given size and the default generation request."""

    name: str
    family: str  # "flux", "wan", "sd3", "hunyuanvideo": selects bench.families.FAMILIES[family]
    source: str  # the published checkpoint this mirrors
    transformer: ModelConfig | DiffusersConfig
    vae: ModelConfig | DiffusersConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: dict[str, Any]
    height: int
    width: int
    steps: int
    guidance_scale: float
    max_sequence_length: int
    num_frames: int | None = None
    negative_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "source": self.source,
            "transformer": self.transformer.to_dict(), "vae": self.vae.to_dict(),
            "text_encoders": [dataclasses.asdict(t) for t in self.text_encoders],
            "scheduler": dict(self.scheduler),
        }


# openai/clip-vit-large-patch14 text tower (FLUX.1 text_encoder). Token ids follow the locally trained
# CLIP tokenizer: <|startoftext|> = 0, <|endoftext|> = 1 (pad = end, as CLIP pads).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
# google/t5-v1_1-xxl encoder (FLUX.1 text_encoder_2), 4.7 B parameters.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# google/umt5-xxl encoder (Wan2.1 text_encoder), 5.7 B parameters (a 256k vocabulary).
UMT5_XXL = dict(T5_XXL, vocab_size=256384)

_FLUX_TEXT = (
    TextEncoderSpec("text_encoder", "CLIPTextModel", "CLIPTextConfig", CLIP_L, "tokenizer", "clip"),
    TextEncoderSpec("text_encoder_2", "T5EncoderModel", "T5Config", T5_XXL, "tokenizer_2", "t5"),
)
_WAN_TEXT = (TextEncoderSpec("text_encoder", "UMT5EncoderModel", "UMT5Config", UMT5_XXL, "tokenizer", "t5"),)
_WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", **SCHEDULER_CONFIGS["wan2.1-480p"]}
WAN_NEGATIVE = "blurry, low quality, distorted, watermark"

# Tiny sizes for the CPU smoke test (same families and layouts, seconds on a CPU).
_TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
_TINY_CLIP = dict(CLIP_L, vocab_size=512, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=24)

# ---- models on diffc's generic (diffusers) backend: configs as the published config.json files give them
# openai/clip-vit-large-patch14 and laion CLIP-ViT-bigG-14 text towers with their projections (SD3 text_encoder
# and text_encoder_2: the pooled output feeds the DiT, the penultimate hidden states the prompt embedding).
CLIP_L_PROJ = dict(CLIP_L, hidden_act="quick_gelu")
CLIP_G_PROJ = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
# the text tower of llava-llama-3-8b (HunyuanVideo text_encoder; its hidden states two layers from the top).
LLAMA3_8B = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SD3_TEXT = (
    TextEncoderSpec("text_encoder", "CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_L_PROJ, "tokenizer", "clip"),
    TextEncoderSpec("text_encoder_2", "CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_G_PROJ, "tokenizer_2",
                    "clip"),
    TextEncoderSpec("text_encoder_3", "T5EncoderModel", "T5Config", T5_XXL, "tokenizer_3", "t5"),
)
HUNYUAN_TEXT = (
    TextEncoderSpec("text_encoder", "LlamaModel", "LlamaConfig", LLAMA3_8B, "tokenizer", "llama"),
    TextEncoderSpec("text_encoder_2", "CLIPTextModel", "CLIPTextConfig", CLIP_L, "tokenizer_2", "clip"),
)
# stabilityai/stable-diffusion-3.5-large: 38 joint blocks, 38 heads of 64, RMS q/k norm, 8.1 B parameters.
SD35_LARGE = DiffusersConfig(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=[])
SD3_VAE = DiffusersConfig(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
# hunyuanvideo-community/HunyuanVideo: 20 dual-stream + 40 single-stream blocks, 24 heads of 128, 12.8 B parameters.
HUNYUAN_DIT = DiffusersConfig(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=[16, 56, 56])
HUNYUAN_VAE = DiffusersConfig(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=["HunyuanVideoDownBlock3D"] * 4,
    up_block_types=["HunyuanVideoUpBlock3D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
    temporal_compression_ratio=4, mid_block_add_attention=True)
FLOW_EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
# Qwen/Qwen3-4B (Z-Image text_encoder, Qwen3Model: its second-to-last hidden states are the caption), 4.0 B parameters.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0)
ZIMAGE_TEXT = (TextEncoderSpec("text_encoder", "Qwen3Model", "Qwen3Config", QWEN3_4B, "tokenizer", "qwen"),)
ZIMAGE_SCHEDULER = dict(FLOW_EULER, shift=3.0, use_dynamic_shifting=False)
_TINY_LLAMA = dict(LLAMA3_8B, vocab_size=512, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# ---- Qwen-Image (native): Qwen/Qwen-Image, -Edit, -Edit-2509 share the DiT, the VAE and the text encoder.
# Qwen/Qwen2.5-VL-7B-Instruct (text_encoder), 8.3 B parameters; the token ids follow the locally trained Qwen2
# tokenizer (diffc.demo.qwen_tokenizer: its special tokens come first).
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu"),
    vocab_size=152064, hidden_size=3584, image_token_id=6, video_token_id=7, vision_start_token_id=3,
    vision_end_token_id=4, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
_QWEN_TEXT = (TextEncoderSpec("text_encoder", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                              QWEN25_VL_7B, "tokenizer", "qwen2"),)
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                  "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                  "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
                  "use_dynamic_shifting": True}
_TINY_QWEN_VL = dict(
    QWEN25_VL_7B, vocab_size=512, hidden_size=32,
    text_config=dict(QWEN25_VL_7B["text_config"], vocab_size=512, hidden_size=32, intermediate_size=37,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [1, 1, 2]}),
    vision_config=dict(QWEN25_VL_7B["vision_config"], depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                       out_hidden_size=32, fullatt_block_indexes=[1], window_size=56))
QWEN_NEGATIVE = " "  # Qwen-Image's usual negative prompt: true CFG on, nothing in particular to avoid

# The tiny specs' text encoders (the tokenizers diffc.demo trains have 512 ids).
_TINY_WAN_TEXT = (TextEncoderSpec("text_encoder", "UMT5EncoderModel", "UMT5Config",
                                  dict(UMT5_XXL, vocab_size=512, **_TINY_TEXT), "tokenizer", "t5"),)
_TINY_QWEN_TEXT = (TextEncoderSpec("text_encoder", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                                   _TINY_QWEN_VL, "tokenizer", "qwen2"),)

SPECS: dict[str, BenchSpec] = {
    "flux-dev": BenchSpec(
        "flux-dev", "flux", "black-forest-labs/FLUX.1-dev", FLUX_TRANSFORMER_SPECS["flux-dev"],
        AUTOENCODER_KL_SPECS["flux"], _FLUX_TEXT, FLUX_SCHEDULER,
        height=1024, width=1024, steps=28, guidance_scale=3.5, max_sequence_length=512),
    "flux-schnell": BenchSpec(
        "flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell", FLUX_TRANSFORMER_SPECS["flux-schnell"],
        AUTOENCODER_KL_SPECS["flux"], _FLUX_TEXT, dict(FLUX_SCHEDULER, use_dynamic_shifting=False, shift=1.0),
        height=1024, width=1024, steps=4, guidance_scale=0.0, max_sequence_length=256),
    "wan-1.3b": BenchSpec(
        "wan-1.3b", "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", WAN_TRANSFORMER_SPECS["wan2.1-t2v-1.3b"],
        WAN_VAE_SPECS["wan2.1"], _WAN_TEXT, _WAN_SCHEDULER,
        height=480, width=832, num_frames=81, steps=50, guidance_scale=5.0, max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE),
    "wan-14b": BenchSpec(
        "wan-14b", "wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers", WAN_TRANSFORMER_SPECS["wan2.1-t2v-14b"],
        WAN_VAE_SPECS["wan2.1"], _WAN_TEXT, _WAN_SCHEDULER,
        height=480, width=832, num_frames=81, steps=50, guidance_scale=5.0, max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE),
    # Wan2.1 I2V 14B 480P: the T2V 14B's blocks plus image cross-attention, 36 input channels; 832x480, 81 frames.
    "wan2.1-i2v-14b": BenchSpec(
        "wan2.1-i2v-14b", "wan-i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", WAN_TRANSFORMER_SPECS["wan2.1-i2v-14b"],
        WAN_VAE_SPECS["wan2.1"], _WAN_TEXT, _WAN_SCHEDULER,
        height=480, width=832, num_frames=81, steps=40, guidance_scale=5.0, max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE),
    # Wan2.2 TI2V-5B: 48-channel Wan2.2 VAE latents (16x spatial), 1280x704 x 121 frames: 31 x 44 x 80 latents,
    # 27,280 tokens, per-token timesteps; DiT forward (and the VAE unless --skip-vae)
    "wan2.2-ti2v-5b": BenchSpec(
        "wan2.2-ti2v-5b", "wan-ti2v", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", WAN_TRANSFORMER_SPECS["wan2.2-ti2v-5b"],
        WAN_VAE_SPECS["wan2.2"], _WAN_TEXT, dict(_WAN_SCHEDULER, flow_shift=5.0),
        height=704, width=1280, num_frames=121, steps=50, guidance_scale=5.0, max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE),
    "wan2.2-ti2v-tiny": BenchSpec(
        "wan2.2-ti2v-tiny", "wan-ti2v", "tiny Wan2.2-TI2V-shaped test DiT and VAE",
        dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], in_channels=8, out_channels=8, text_dim=32),
        dataclasses.replace(WAN_VAE_SPECS["wan2.2"], base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=(1, 2, 2),
                            num_res_blocks=1, temperal_downsample=(False, True), latents_mean=(0.0,) * 8,
                            latents_std=(1.0,) * 8, scale_factor_spatial=8, scale_factor_temporal=2),
        _TINY_WAN_TEXT, _WAN_SCHEDULER, height=32, width=48, num_frames=5, steps=3, guidance_scale=5.0,
        max_sequence_length=16, negative_prompt=WAN_NEGATIVE),
    # FLUX.1 Kontext [dev]: FLUX.1-dev's transformer and VAE; the edit's 1024x1024 input image doubles the image
    # tokens (4096 + 4096 + 512 text) of every forward. guidance 2.5 as BFL's examples.
    "flux-kontext": BenchSpec(
        "flux-kontext", "flux-kontext", "black-forest-labs/FLUX.1-Kontext-dev", FLUX_TRANSFORMER_SPECS["flux-dev"],
        AUTOENCODER_KL_SPECS["flux"], _FLUX_TEXT, FLUX_SCHEDULER,
        height=1024, width=1024, steps=28, guidance_scale=2.5, max_sequence_length=512),
    # Tongyi-MAI/Z-Image-Turbo: 6 B single-stream DiT, Qwen3-4B captions, FLUX's VAE; 8 steps, no guidance.
    "z-image-turbo": BenchSpec(
        "z-image-turbo", "zimage", "Tongyi-MAI/Z-Image-Turbo", ZIMAGE_TRANSFORMER_SPECS["z-image-turbo"],
        AUTOENCODER_KL_SPECS["flux"], ZIMAGE_TEXT, ZIMAGE_SCHEDULER,
        height=1024, width=1024, steps=8, guidance_scale=0.0, max_sequence_length=512),
    "z-image-tiny": BenchSpec(
        "z-image-tiny", "zimage", "tiny Z-Image-shaped test pipeline",
        dataclasses.replace(ZIMAGE_TRANSFORMER_SPECS["z-image-turbo"], in_channels=4, dim=32, n_layers=2,
                            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=(4, 6, 6)),
        dataclasses.replace(AUTOENCODER_KL_SPECS["tiny"], latent_channels=4),
        (TextEncoderSpec("text_encoder", "Qwen3Model", "Qwen3Config",
                         dict(QWEN3_4B, vocab_size=512, hidden_size=24, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024),
                         "tokenizer", "qwen"),),
        ZIMAGE_SCHEDULER, height=32, width=48, steps=3, guidance_scale=0.0, max_sequence_length=64),
    # 1024x1024: 4,096 image tokens (+ the prompt, padded to a 128-token bucket), true CFG (two forwards a step).
    "qwen-image": BenchSpec(
        "qwen-image", "qwen_image", "Qwen/Qwen-Image", QWEN_IMAGE_TRANSFORMER_SPECS["qwen-image"],
        QWEN_IMAGE_VAE_SPECS["qwen-image"], _QWEN_TEXT, QWEN_SCHEDULER,
        height=1024, width=1024, steps=50, guidance_scale=4.0, max_sequence_length=128, negative_prompt=QWEN_NEGATIVE),
    # editing one 1024x1024 image: its 4,096 latent tokens join the sequence (8,192 image tokens a forward)
    "qwen-image-edit": BenchSpec(
        "qwen-image-edit", "qwen_image_edit", "Qwen/Qwen-Image-Edit", QWEN_IMAGE_TRANSFORMER_SPECS["qwen-image"],
        QWEN_IMAGE_VAE_SPECS["qwen-image"], _QWEN_TEXT, QWEN_SCHEDULER,
        height=1024, width=1024, steps=50, guidance_scale=4.0, max_sequence_length=128, negative_prompt=QWEN_NEGATIVE),
    "qwen-image-tiny": BenchSpec(
        "qwen-image-tiny", "qwen_image", "tiny Qwen-Image-shaped test pipeline",
        dataclasses.replace(QWEN_IMAGE_TRANSFORMER_SPECS["tiny"], in_channels=64, out_channels=16),
        QWEN_IMAGE_VAE_SPECS["tiny"],
        _TINY_QWEN_TEXT,
        QWEN_SCHEDULER, height=32, width=48, steps=3, guidance_scale=4.0, max_sequence_length=128,
        negative_prompt=QWEN_NEGATIVE),
    "qwen-image-edit-tiny": BenchSpec(
        "qwen-image-edit-tiny", "qwen_image_edit", "tiny Qwen-Image-Edit-shaped test pipeline",
        dataclasses.replace(QWEN_IMAGE_TRANSFORMER_SPECS["tiny"], in_channels=64, out_channels=16),
        QWEN_IMAGE_VAE_SPECS["tiny"],
        _TINY_QWEN_TEXT,
        QWEN_SCHEDULER, height=32, width=48, steps=3, guidance_scale=4.0, max_sequence_length=128,
        negative_prompt=QWEN_NEGATIVE),
    "flux-tiny": BenchSpec(
        "flux-tiny", "flux", "tiny FLUX.1-dev-shaped test pipeline",
        dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], joint_attention_dim=32, pooled_projection_dim=24),
        dataclasses.replace(AUTOENCODER_KL_SPECS["tiny"], latent_channels=4),
        (TextEncoderSpec("text_encoder", "CLIPTextModel", "CLIPTextConfig", _TINY_CLIP, "tokenizer", "clip"),
         TextEncoderSpec("text_encoder_2", "T5EncoderModel", "T5Config", dict(T5_XXL, vocab_size=512, **_TINY_TEXT),
                         "tokenizer_2", "t5")),
        FLUX_SCHEDULER, height=32, width=48, steps=3, guidance_scale=3.5, max_sequence_length=16),
    "wan-tiny": BenchSpec(
        "wan-tiny", "wan", "tiny Wan2.1-T2V-shaped test pipeline",
        dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], in_channels=16, out_channels=16, text_dim=32),
        WAN_VAE_SPECS["tiny"],
        _TINY_WAN_TEXT,
        _WAN_SCHEDULER, height=32, width=48, num_frames=5, steps=3, guidance_scale=5.0, max_sequence_length=16,
        negative_prompt=WAN_NEGATIVE),
    # 512 text tokens: diffusers' Wan attention finds the image tokens by assuming 512 text tokens after them
    "wan2.1-i2v-tiny": BenchSpec(
        "wan2.1-i2v-tiny", "wan-i2v", "tiny Wan2.1-I2V-shaped test DiT",
        dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], in_channels=36, out_channels=16, text_dim=32, image_dim=20,
                            added_kv_proj_dim=24),
        WAN_VAE_SPECS["tiny"],
        _TINY_WAN_TEXT,
        _WAN_SCHEDULER, height=32, width=48, num_frames=5, steps=3, guidance_scale=5.0, max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE),
    # generic (diffusers) backend; SD3.5 runs classifier-free guidance as one batch-2 forward per step
    "sd3.5-large": BenchSpec(
        "sd3.5-large", "sd3", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE, SD3_VAE, SD3_TEXT,
        dict(FLOW_EULER, shift=3.0), height=1024, width=1024, steps=28, guidance_scale=3.5, max_sequence_length=256),
    # 544x960, 61 frames: 16 latent frames of 68x120, 32,640 video tokens (+256 text) per forward, one forward a
    # step (embedded guidance); 30 steps. At ~1.6 PFLOP a forward, one configuration's generation takes minutes
    # on an H200: run the configurations in separate calls (bench/README.md).
    "hunyuanvideo": BenchSpec(
        "hunyuanvideo", "hunyuanvideo", "hunyuanvideo-community/HunyuanVideo", HUNYUAN_DIT, HUNYUAN_VAE, HUNYUAN_TEXT,
        dict(FLOW_EULER, shift=7.0), height=544, width=960, num_frames=61, steps=30, guidance_scale=6.0,
        max_sequence_length=256),
    "sd3-tiny": BenchSpec(
        "sd3-tiny", "sd3", "tiny SD3.5-shaped test pipeline",
        SD35_LARGE.replace(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                           joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=48,
                           pos_embed_max_size=16),
        SD3_VAE.replace(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=16, sample_size=32),
        (TextEncoderSpec("text_encoder", "CLIPTextModelWithProjection", "CLIPTextConfig", _TINY_CLIP, "tokenizer",
                         "clip"),
         TextEncoderSpec("text_encoder_2", "CLIPTextModelWithProjection", "CLIPTextConfig", _TINY_CLIP, "tokenizer_2",
                         "clip"),
         TextEncoderSpec("text_encoder_3", "T5EncoderModel", "T5Config", dict(T5_XXL, vocab_size=512, **_TINY_TEXT),
                         "tokenizer_3", "t5")),
        dict(FLOW_EULER, shift=3.0), height=32, width=48, steps=3, guidance_scale=3.5, max_sequence_length=16),
    "hunyuanvideo-tiny": BenchSpec(
        "hunyuanvideo-tiny", "hunyuanvideo", "tiny HunyuanVideo-shaped test pipeline",
        HUNYUAN_DIT.replace(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                            num_refiner_layers=1, patch_size=1, text_embed_dim=32, pooled_projection_dim=24,
                            rope_axes_dim=[4, 6, 6]),
        HUNYUAN_VAE.replace(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4),
        (TextEncoderSpec("text_encoder", "LlamaModel", "LlamaConfig", _TINY_LLAMA, "tokenizer", "llama"),
         TextEncoderSpec("text_encoder_2", "CLIPTextModel", "CLIPTextConfig", _TINY_CLIP, "tokenizer_2", "clip")),
        dict(FLOW_EULER, shift=7.0), height=32, width=32, num_frames=5, steps=2, guidance_scale=6.0,
        max_sequence_length=16),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One generation request (the spec's defaults with command-line overrides) and its prompt and seed."""

    height: int
    width: int
    num_frames: int | None
    steps: int
    guidance_scale: float
    max_sequence_length: int
    negative_prompt: str | None
    prompt: str = "a red fox in snow, golden hour, highly detailed"
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: BenchSpec, **overrides) -> "Workload":
        values = dict(height=spec.height, width=spec.width, num_frames=spec.num_frames, steps=spec.steps,
                      guidance_scale=spec.guidance_scale, max_sequence_length=spec.max_sequence_length,
                      negative_prompt=spec.negative_prompt)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if spec.num_frames is None:
            values["num_frames"] = None
        return cls(**values)
