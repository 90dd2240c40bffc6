"""Qwen-Image text-to-image: Qwen2.5-VL text encoder, the Qwen-Image MMDiT, the Qwen-Image (Wan-style) VAE.

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess. The
math, dtypes and layouts follow diffusers' ``QwenImagePipeline`` so the same seed gives the same image:
2x2-packed latents, the resolution-dependent ("dynamic") shift of the flow-match sampler, and true
classifier-free guidance, on when ``true_cfg_scale > 1`` and a negative prompt is given, as two DiT calls
per step whose combination is rescaled to the conditional prediction's norm.

Qwen-Image is not guidance-distilled: ``true_cfg_scale`` is its guidance scale. A request that gives only
``guidance_scale`` uses it as ``true_cfg_scale`` (the one guidance knob of ``diffc run --guidance``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .base import GenerationRequest, PipelineSpec, check_image_model_frames, check_int, nearest_valid
from .fit import check_fit, setting
from .denoise import check_terminal_steps, cpu_generators, denoise_loop, modulation_table, seeded_noise
from .flux import pack_latents, postprocess
from .qwen_vl import T2I_DROP, T2I_TEMPLATE, TEXT_BUCKET, TOKENIZER_MAX_LENGTH, encode_texts, pad_to_bucket
from .schedulers.flow_match_euler import calculate_shift, check_time_shift
from .stages import RunContext, Stage

DEFAULT_TRUE_CFG = 4.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def vae_scale_factor(vae) -> int:
    return vae.spatial_compression_ratio


def cfg_scale(s) -> float:
    """The true-CFG scale of a request: ``true_cfg_scale``, else ``guidance_scale``, else Qwen-Image's 4.0."""
    for key in ("true_cfg_scale", "guidance_scale"):
        if s.get(key) is not None:
            return float(s[key])
    return DEFAULT_TRUE_CFG


def negatives_for(s) -> list[str] | None:
    """One negative prompt per prompt when true CFG is on (scale > 1 and a negative prompt given), else None."""
    negative = s["negative_prompt"]
    if negative is None or cfg_scale(s) <= 1:
        return None
    negatives = [negative] if isinstance(negative, str) else list(negative)
    return negatives * len(s["prompt"]) if len(negatives) == 1 else negatives


def cfg_warnings(ctx: RunContext, s) -> None:
    scale = cfg_scale(s)
    if s["negative_prompt"] is not None and scale <= 1:
        ctx.warnings.append(f"negative_prompt is ignored: true CFG needs true_cfg_scale > 1 (got {scale})")
    elif s["negative_prompt"] is None and s.get("true_cfg_scale") is not None and scale > 1:
        ctx.warnings.append(f"true_cfg_scale={scale} has no effect without a negative prompt "
                            "(Qwen-Image's usual one is \" \")")


def prompt_tokens(pipe, prompt: str, max_sequence_length: int) -> int:
    """Text tokens the DiT holds for ``prompt`` (before :func:`pad_to_bucket`): the template's, minus its prefix."""
    ids = pipe.components["tokenizer"](T2I_TEMPLATE.format(prompt), max_length=TOKENIZER_MAX_LENGTH + T2I_DROP,
                                       truncation=True).input_ids
    return min(len(ids) - T2I_DROP, max_sequence_length)


def encode_prompt(ctx: RunContext, s):
    cfg_warnings(ctx, s)
    max_len = s["max_sequence_length"]
    texts = [T2I_TEMPLATE.format(p) for p in s["prompt"]]
    cond = encode_texts(ctx, texts, None, T2I_DROP, max_len, "prompt")
    negatives = negatives_for(s)
    uncond = None
    if negatives is not None:
        uncond = encode_texts(ctx, [T2I_TEMPLATE.format(n) for n in negatives], None, T2I_DROP, max_len,
                              "negative prompt")
    (embeds, mask), (neg_embeds, neg_mask) = pad_to_bucket(cond, uncond)
    return {"prompt_embeds": embeds, "prompt_mask": mask, "negative_prompt_embeds": neg_embeds,
            "negative_prompt_mask": neg_mask}


def latent_hw(vae, height: int, width: int) -> tuple[int, int]:
    f = vae_scale_factor(vae)
    return 2 * (height // (f * 2)), 2 * (width // (f * 2))


def noise_latents(ctx: RunContext, s, dtype: torch.dtype) -> torch.Tensor:
    """Seeded noise drawn as (B, 1, C, h, w), as diffusers draws it, packed to (B, h/2 * w/2, 4C)."""
    h, w = latent_hw(ctx.components["vae"], s["height"], s["width"])
    channels = ctx.components["transformer"].config.in_channels // 4
    noise = seeded_noise((len(s["prompt"]), 1, channels, h, w), cpu_generators(s["seeds"]), dtype, ctx.device)
    return pack_latents(noise[:, 0])


def prepare_latents(ctx: RunContext, s):
    h, w = latent_hw(ctx.components["vae"], s["height"], s["width"])
    return {"latents": noise_latents(ctx, s, s["prompt_embeds"].dtype), "img_shapes": ((1, h // 2, w // 2),)}


def prepare_timesteps(ctx: RunContext, s):
    scheduler = ctx.components["scheduler"]
    n = s["num_inference_steps"]
    cfg = scheduler.config
    mu = calculate_shift(s["latents"].shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len,
                         cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(n, device=ctx.device, sigmas=np.linspace(1.0, 1 / n, n).tolist(), mu=mu)
    return {"timesteps": scheduler.timesteps}


def guided_predict(ctx: RunContext, s, condition: torch.Tensor | None = None):
    """``predict(x, t)`` for the denoise loop: the DiT on ``x`` (plus ``condition``, the input images' packed
    latents, appended to the sequence), conditional then unconditional with diffusers' norm rescale."""
    transformer = ctx.components["transformer"]
    scale = cfg_scale(s)
    negative = s["negative_prompt_embeds"]
    shapes = s["img_shapes"]
    dtype = s["latents"].dtype
    # the modulation depends on the timestep only: one row serves the conditional and the unconditional call
    table = modulation_table(transformer, s["timesteps"], 1, lambda t, steps: {"timestep": t.to(dtype) / 1000,
                                                                               "dtype": dtype}, dtype)

    def call(x, t, embeds, mask, extra):
        x_in = x if condition is None else torch.cat([x, condition], dim=1)
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        out = transformer(hidden_states=x_in, encoder_hidden_states=embeds, timestep=timestep, img_shapes=shapes,
                          encoder_hidden_states_mask=mask, **extra)
        return out[:, : x.shape[1]]

    def predict(x, t):
        modulation = None if table is None else table(t)
        extra = {} if modulation is None else {"modulation": modulation}
        pred = call(x, t, s["prompt_embeds"], s["prompt_mask"], extra)
        if negative is None:
            return pred
        neg = call(x, t, negative, s["negative_prompt_mask"], extra)
        combined = neg + scale * (pred - neg)
        return combined * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    return predict


def denoise(ctx: RunContext, s):
    predict = guided_predict(ctx, s)
    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], s["latents"], s["timesteps"], predict)}


def decode(ctx: RunContext, s):
    vae = ctx.components["vae"]
    h, w = latent_hw(vae, s["height"], s["width"])
    b, _, channels = s["latents"].shape
    latents = s["latents"].view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    latents = latents.reshape(b, channels // 4, 1, h, w).to(next(vae.parameters()).dtype)
    return {"decoded": vae.decode(vae.denormalize(latents))[:, :, 0]}  # (B, 3, H, W) in [-1, 1]


STAGE_INPUTS = ("prompt", "negative_prompt", "true_cfg_scale", "guidance_scale")
DENOISE_INPUTS = ("latents", "timesteps", "img_shapes", "prompt_embeds", "prompt_mask", "negative_prompt_embeds",
                  "negative_prompt_mask", "true_cfg_scale", "guidance_scale")
ENCODED = ("prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_prompt_mask")


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, STAGE_INPUTS + ("max_sequence_length",), ENCODED),
        Stage("prepare_latents", prepare_latents, ("prompt", "height", "width", "seeds", "prompt_embeds"),
              ("latents", "img_shapes")),
        Stage("prepare_timesteps", prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
        Stage("denoise", denoise, DENOISE_INPUTS, ("latents",)),
        Stage("decode", decode, ("latents", "height", "width"), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("images",)),
    ]


def check_size(pipe, request: GenerationRequest) -> None:
    c = pipe.components
    c["vae"].check_latent_stats()  # read only at the decode otherwise, after the whole denoising
    dit = c["transformer"].config
    check_fit(pipe.spec.pipeline_class, [  # the Qwen2.5-VL encoder and the VAE fit the DiT (.fit)
        ("text_encoder's width (hidden_size)", setting(c["text_encoder"], "text_config.hidden_size", "hidden_size"),
         "the transformer's joint_attention_dim", dit.joint_attention_dim),
        ("4 x the vae's z_dim", 4 * c["vae"].config.z_dim, "the transformer's in_channels", dit.in_channels),
        ("the transformer's output width (patch_size² x out_channels)", dit.patch_size ** 2 * dit.output_channels,
         "its in_channels", dit.in_channels),
    ])
    multiple = 2 * vae_scale_factor(pipe.components["vae"])
    for field in ("height", "width"):
        value = getattr(request, field)
        if value % multiple:
            raise InvalidArgumentError(field, f"Qwen-Image needs a multiple of {multiple}, got {value} "
                                       f"(try {nearest_valid(value, multiple, 0, multiple)})")
    check_time_shift(pipe.components["scheduler"], request.height, request.width, multiple ** 2)
    check_image_model_frames(request, "Qwen-Image")
    check_terminal_steps(pipe.components["scheduler"], request.num_inference_steps)
    scale = request.true_cfg_scale
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not np.isfinite(scale) or not 0 <= scale <= 100):
        raise InvalidArgumentError("true_cfg_scale", f"must be a number from 0 to 100, got {scale!r}")


def validate(pipe, request: GenerationRequest) -> None:
    check_size(pipe, request)
    check_int("max_sequence_length", request.max_sequence_length, 1, TOKENIZER_MAX_LENGTH)


QWEN_IMAGE_SPEC = PipelineSpec(
    family="qwen_image",
    pipeline_class="QwenImagePipeline",
    output="image",
    components=("scheduler", "text_encoder", "tokenizer", "transformer", "vae"),
    defaults={"height": 1024, "width": 1024, "num_inference_steps": 50,
              "max_sequence_length": DEFAULT_MAX_SEQUENCE_LENGTH},
    build_stages=build_stages,
    validate=validate,
    uses_negative_prompt=True,
    true_cfg=True,
    prompt_shapes=True,
    prompt_tokens=prompt_tokens,
    prompt_multiple=TEXT_BUCKET,
)
