"""FLUX.1 text-to-image (dev and schnell): CLIP + T5 text encoders, the FLUX DiT, the FLUX VAE.

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess.
The math and tensor layouts follow diffusers' FluxPipeline so the same seed gives the same image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .base import GenerationRequest, PipelineSpec, check_image_model_frames, check_int, nearest_valid
from .fit import check_fit, setting
from .denoise import check_terminal_steps, cpu_generators, denoise_loop, modulation_table, seeded_noise
from .schedulers.flow_match_euler import calculate_shift, check_time_shift
from .stages import RunContext, Stage, check_finite, to_uint8
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


def _encode(ctx: RunContext, prompts: list[str], max_length: int, label: str = ""):
    c = ctx.components
    clip_len = c["tokenizer"].model_max_length
    clip_ids, _ = tokenize(ctx, c["tokenizer"], prompts, clip_len, "CLIP" + label)
    pooled = c["text_encoder"](clip_ids.to(ctx.device), output_hidden_states=False).pooler_output
    t5_ids, _ = tokenize(ctx, c["tokenizer_2"], prompts, max_length, "T5" + label)
    embeds = c["text_encoder_2"](t5_ids.to(ctx.device), output_hidden_states=False)[0]
    return embeds.to(ctx.dtype), pooled.to(ctx.dtype)


def true_cfg_on(s) -> bool:
    """diffusers' rule: true classifier-free guidance runs when ``true_cfg_scale > 1`` and a negative prompt is given."""
    return (s.get("true_cfg_scale") or 1.0) > 1 and s.get("negative_prompt") is not None


def encode_prompt(ctx: RunContext, s):
    """T5 states, pooled CLIP embedding and text ids; with true CFG also the negative prompt's."""
    prompts = s["prompt"]
    embeds, pooled = _encode(ctx, prompts, s["max_sequence_length"])
    text_ids = torch.zeros(embeds.shape[1], 3, device=ctx.device, dtype=ctx.dtype)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids,
           "negative_prompt_embeds": None, "negative_pooled_prompt_embeds": None}
    if true_cfg_on(s):
        negative = s["negative_prompt"]
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        neg, neg_pooled = _encode(ctx, negatives, s["max_sequence_length"], " (negative prompt)")
        out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    return out


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


def flux_predictor(ctx: RunContext, s, batch: int, image_latents: torch.Tensor | None = None,
                   img_ids: torch.Tensor | None = None):
    """``predict(x, t)`` for the denoise loop: the FLUX DiT on ``x`` (and ``image_latents`` appended to the
    sequence, Kontext), with true CFG ``neg + scale * (pos - neg)`` from one batched forward when it is on."""
    transformer = ctx.components["transformer"]
    img_ids = s["img_ids"] if img_ids is None else img_ids
    embeds, pooled = s["prompt_embeds"], s["pooled_prompt_embeds"]
    cfg = s.get("negative_prompt_embeds") is not None
    scale = s.get("true_cfg_scale")
    if cfg:
        embeds = torch.cat([embeds, s["negative_prompt_embeds"]])
        pooled = torch.cat([pooled, s["negative_pooled_prompt_embeds"]])
    rows = 2 * batch if cfg else batch
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], s["guidance_scale"], device=ctx.device, dtype=torch.float32).expand(rows)
    dtype = s["latents"].dtype

    def modulation_inputs(t: torch.Tensor, steps: int) -> dict:  # as the call below passes them, for steps x rows
        return {"timestep": t.to(dtype) / 1000, "pooled_projections": pooled.repeat(steps, 1),
                "guidance": None if guidance is None else guidance.repeat(steps), "dtype": dtype}

    table = modulation_table(transformer, s["timesteps"], rows, modulation_inputs, dtype)

    def predict(x, t):
        n = x.shape[1]
        if image_latents is not None:
            x = torch.cat([x, image_latents], dim=1)
        if cfg:
            x = torch.cat([x, x])
        timestep = t.expand(rows).to(x.dtype)
        modulation = None if table is None else table(t)
        extra = {} if modulation is None else {"modulation": modulation}
        out = transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=s["text_ids"], img_ids=img_ids, **extra)[:, :n]
        if not cfg:
            return out
        pos, neg = out.chunk(2)
        return neg + scale * (pos - neg)

    return predict


def denoise(ctx: RunContext, s):
    latents = s["latents"]
    predict = flux_predictor(ctx, s, latents.shape[0])
    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], latents, s["timesteps"], predict)}


def decode(ctx: RunContext, s):
    vae = ctx.components["vae"]
    f = vae_scale_factor(vae)
    h, w = 2 * (s["height"] // (f * 2)), 2 * (s["width"] // (f * 2))
    latents = unpack_latents(s["latents"], h, w)
    latents = latents / vae.scaling_factor + vae.shift_factor  # shift 0 where the VAE has none
    return {"decoded": vae.decode(latents)}


def postprocess(ctx: RunContext, s):
    check_finite(ctx, s["decoded"])
    image = (s["decoded"] / 2 + 0.5).clamp(0, 1)
    return {"images": list(to_uint8(image))}


ENCODE_INPUTS = ("prompt", "max_sequence_length", "negative_prompt", "true_cfg_scale")
ENCODE_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds", "text_ids", "negative_prompt_embeds",
                  "negative_pooled_prompt_embeds")
DENOISE_INPUTS = ("guidance_scale", "true_cfg_scale") + ENCODE_OUTPUTS


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, ENCODE_INPUTS, ENCODE_OUTPUTS),
        Stage("prepare_latents", prepare_latents, ("prompt", "height", "width", "seeds"), ("latents", "img_ids")),
        Stage("prepare_timesteps", prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "timesteps", "img_ids") + DENOISE_INPUTS, ("latents",)),
        Stage("decode", decode, ("latents", "height", "width"), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("images",)),
    ]


def check_components(pipe) -> None:
    """CLIP, T5 and the VAE fit the DiT (:mod:`.fit`)."""
    c = pipe.components
    dit = c["transformer"].config
    check_fit(pipe.spec.pipeline_class, [
        ("text_encoder_2's width (d_model)", setting(c["text_encoder_2"], "d_model"),
         "the transformer's joint_attention_dim", dit.joint_attention_dim),
        ("text_encoder's width (hidden_size)", setting(c["text_encoder"], "hidden_size"),
         "the transformer's pooled_projection_dim", dit.pooled_projection_dim),
        ("4 x the vae's latent_channels", 4 * c["vae"].config.latent_channels,
         "the transformer's in_channels", dit.in_channels),
        ("the transformer's output width (patch_size² x out_channels)", dit.patch_size ** 2 * dit.output_channels,
         "its in_channels", dit.in_channels),
    ])


def validate(pipe, request: GenerationRequest) -> None:
    check_components(pipe)
    check_terminal_steps(pipe.components["scheduler"], request.num_inference_steps)
    multiple = 2 * vae_scale_factor(pipe.components["vae"])
    for field in ("height", "width"):
        value = getattr(request, field)
        if value % multiple:
            raise InvalidArgumentError(field, f"FLUX needs a multiple of {multiple}, got {value} "
                                       f"(try {nearest_valid(value, multiple, 0, multiple)})")
    check_time_shift(pipe.components["scheduler"], request.height, request.width, multiple ** 2)
    check_int("max_sequence_length", request.max_sequence_length, 1, T5_MAX_LENGTH)
    check_image_model_frames(request, "FLUX.1")
    check_true_cfg(request, pipe.spec.pipeline_class)


def check_true_cfg(request: GenerationRequest, pipeline_class: str) -> None:
    g = request.true_cfg_scale
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                          or not 0 <= g <= 100):
        raise InvalidArgumentError("true_cfg_scale", f"must be a number from 0 to 100, got {g!r}")
    if request.negative_prompt is not None and not (g is not None and g > 1):
        raise InvalidArgumentError("negative_prompt", f"{pipeline_class} uses a negative prompt only with "
                                   f"true_cfg_scale > 1 (true classifier-free guidance); true_cfg_scale is "
                                   f"{'not set' if g is None else g}")
    if g is not None and g > 1 and request.negative_prompt is None:
        raise InvalidArgumentError("true_cfg_scale", f"{g} > 1 turns on true classifier-free guidance, which needs "
                                   "a negative_prompt (it may be \"\")")


FLUX_SPEC = PipelineSpec(
    family="flux",
    pipeline_class="FluxPipeline",
    output="image",
    components=("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae"),
    defaults={"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5,
              "max_sequence_length": T5_MAX_LENGTH},
    build_stages=build_stages,
    validate=validate,
    uses_negative_prompt=True,  # with true_cfg_scale > 1
    true_cfg=True,
)
