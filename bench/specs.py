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
from diffc.pipelines.schedulers.unipc import SCHEDULER_CONFIGS


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder and its tokenizer, as components of the pipeline directory."""

    component: str  # "text_encoder", "text_encoder_2"
    model_class: str  # transformers class: CLIPTextModel, T5EncoderModel, UMT5EncoderModel
    config_class: str  # transformers config class
    config: dict[str, Any]
    tokenizer_component: str
    tokenizer_kind: str  # "clip" or "t5": which diffc.demo.tokenizers trainer makes it


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """A benchmark workload: the pipeline's parts at a given size and the default generation request."""

    name: str
    family: str  # "flux" or "wan": selects bench.families.FAMILIES[family]
    source: str  # the published checkpoint this mirrors
    transformer: ModelConfig
    vae: ModelConfig
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
        (TextEncoderSpec("text_encoder", "UMT5EncoderModel", "UMT5Config", dict(UMT5_XXL, vocab_size=512, **_TINY_TEXT),
                         "tokenizer", "t5"),),
        _WAN_SCHEDULER, height=32, width=48, num_frames=5, steps=3, guidance_scale=5.0, max_sequence_length=16,
        negative_prompt=WAN_NEGATIVE),
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
