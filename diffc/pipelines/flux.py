"""FLUX.1 text-to-image (dev and schnell): CLIP + T5 text encoders, the FLUX DiT, the FLUX VAE.

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess.
The math and tensor layouts follow diffusers' FluxPipeline so the same seed gives the same image.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .base import GenerationRequest, PipelineSpec, check_int, nearest_valid
from .denoise import cpu_generators, denoise_loop, seeded_noise
from .schedulers.flow_match_euler import calculate_shift
from .stages import RunContext, Stage
from .text import tokenize

T5_MAX_LENGTH = 512


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches become tokens
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # (B, H/2 * W/2, C*4) -> (B, C, H, W), with h, w the latent height and width
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h2*w2, 3) position ids: (0, row, column) for each packed latent token."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] += torch.arange(h2)[:, None]
    ids[..., 2] += torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def encode_prompt(ctx: RunContext, s):
    c = ctx.components
    prompts = s["prompt"]
    clip_len = c["tokenizer"].model_max_length
    clip_ids, _ = tokenize(ctx, c["tokenizer"], prompts, clip_len, "CLIP")
    pooled = c["text_encoder"](clip_ids.to(ctx.device), output_hidden_states=False).pooler_output
    t5_ids, _ = tokenize(ctx, c["tokenizer_2"], prompts, s["max_sequence_length"], "T5")
    embeds = c["text_encoder_2"](t5_ids.to(ctx.device), output_hidden_states=False)[0]
    text_ids = torch.zeros(embeds.shape[1], 3, device=ctx.device, dtype=ctx.dtype)
    return {"prompt_embeds": embeds.to(ctx.dtype), "pooled_prompt_embeds": pooled.to(ctx.dtype), "text_ids": text_ids}


def prepare_latents(ctx: RunContext, s):
    transformer, vae = ctx.components["transformer"], ctx.components["vae"]
    f = vae_scale_factor(vae)
    h, w = 2 * (s["height"] // (f * 2)), 2 * (s["width"] // (f * 2))
    batch = len(s["prompt"])
    shape = (batch, transformer.config.in_channels // 4, h, w)
    noise = seeded_noise(shape, cpu_generators(s["seeds"]), ctx.dtype, ctx.device)
    return {"latents": pack_latents(noise), "img_ids": latent_image_ids(h // 2, w // 2, ctx.device, ctx.dtype)}


def prepare_timesteps(ctx: RunContext, s):
    scheduler = ctx.components["scheduler"]
    n = s["num_inference_steps"]
    cfg = scheduler.config
    sigmas = None if getattr(cfg, "use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n).tolist()
    mu = calculate_shift(s["latents"].shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len,
                         cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(n, device=ctx.device, sigmas=sigmas, mu=mu)
    return {"timesteps": scheduler.timesteps}


def denoise(ctx: RunContext, s):
    transformer = ctx.components["transformer"]
    latents = s["latents"]
    batch = latents.shape[0]
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], s["guidance_scale"], device=ctx.device, dtype=torch.float32).expand(batch)

    def predict(x, t):
        timestep = t.expand(batch).to(x.dtype)
        return transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=s["pooled_prompt_embeds"], encoder_hidden_states=s["prompt_embeds"],
                           txt_ids=s["text_ids"], img_ids=s["img_ids"])

    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], latents, s["timesteps"], predict)}


def decode(ctx: RunContext, s):
    vae = ctx.components["vae"]
    f = vae_scale_factor(vae)
    h, w = 2 * (s["height"] // (f * 2)), 2 * (s["width"] // (f * 2))
    latents = unpack_latents(s["latents"], h, w)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return {"decoded": vae.decode(latents)}


def postprocess(ctx: RunContext, s):
    image = (s["decoded"] / 2 + 0.5).clamp(0, 1)
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return {"images": list((array * 255).round().astype("uint8"))}


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, ("prompt", "max_sequence_length"),
              ("prompt_embeds", "pooled_prompt_embeds", "text_ids")),
        Stage("prepare_latents", prepare_latents, ("prompt", "height", "width", "seeds"), ("latents", "img_ids")),
        Stage("prepare_timesteps", prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "timesteps", "guidance_scale", "prompt_embeds", "pooled_prompt_embeds",
                                   "text_ids", "img_ids"), ("latents",)),
        Stage("decode", decode, ("latents", "height", "width"), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("images",)),
    ]


def validate(pipe, request: GenerationRequest) -> None:
    multiple = 2 * vae_scale_factor(pipe.components["vae"])
    for field in ("height", "width"):
        value = getattr(request, field)
        if value % multiple:
            raise InvalidArgumentError(field, f"FLUX needs a multiple of {multiple}, got {value} "
                                       f"(try {nearest_valid(value, multiple, 0, multiple)})")
    check_int("max_sequence_length", request.max_sequence_length, 1, T5_MAX_LENGTH)
    if request.num_frames not in (None, 1):
        raise InvalidArgumentError("num_frames", "FLUX.1 is an image model; num_frames is for video models")


FLUX_SPEC = PipelineSpec(
    family="flux",
    pipeline_class="FluxPipeline",
    output="image",
    components=("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae"),
    defaults={"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5,
              "max_sequence_length": T5_MAX_LENGTH},
    build_stages=build_stages,
    validate=validate,
)
