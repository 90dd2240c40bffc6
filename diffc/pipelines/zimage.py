"""Z-Image / Z-Image-Turbo text-to-image: Qwen3 text encoder (chat template, second-to-last hidden
layer), the Z-Image single-stream DiT, the FLUX-style AutoencoderKL.

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess.
The math follows diffusers' ZImagePipeline: float32 latents, the DiT called with ``(1000 - t) / 1000``
and its output negated into the flow velocity, and classifier-free guidance (whenever
``guidance_scale > 0``, as diffusers does) as ``cond + scale * (cond - uncond)`` from one batched DiT
forward. Defaults are Z-Image-Turbo's: 1024x1024, 8 steps, no guidance.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ..models.zimage.transformer import SEQ_MULTI_OF, caption_layout
from .base import GenerationRequest, PipelineSpec, check_image_model_frames, check_int, nearest_valid
from .fit import check_fit, setting
from .denoise import check_terminal_steps, cpu_generators, denoise_loop, seeded_noise
from .flux import postprocess, vae_scale_factor
from .schedulers.flow_match_euler import calculate_shift, check_time_shift
from .stages import RunContext, Stage
from .text import tokenize

MAX_SEQUENCE_LENGTH = 512
MAX_TEXT_TOKENS = 896  # the DiT's caption RoPE axis holds 1024 positions; captions pad to a multiple of 32


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt wrapped in the tokenizer's chat template as a user turn (Z-Image's prompt format)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def prompt_tokens(pipe, prompt: str, max_sequence_length: int) -> int:
    """Caption tokens the DiT holds for ``prompt`` (before its padding to a multiple of 32)."""
    tokenizer = pipe.components["tokenizer"]
    return len(tokenizer(chat_prompt(tokenizer, prompt), max_length=max_sequence_length, truncation=True).input_ids)


def _embed(ctx: RunContext, prompts: list[str], max_length: int, label: str):
    """Qwen3's second-to-last hidden states (B, max_length, hidden) and the token mask (B, max_length) bool."""
    tokenizer, encoder = ctx.components["tokenizer"], ctx.components["text_encoder"]
    ids, mask = tokenize(ctx, tokenizer, [chat_prompt(tokenizer, p) for p in prompts], max_length, label)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device).bool()
    # no KV cache: an encoder pass keeps nothing for later tokens (Qwen3Model would concatenate every layer's K/V)
    states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-2]
    return states.to(ctx.dtype), mask


def encode_prompt(ctx: RunContext, s):
    prompts, max_length = s["prompt"], s["max_sequence_length"]
    embeds, mask = _embed(ctx, prompts, max_length, "Qwen3")
    if s["guidance_scale"] <= 0:
        if s["negative_prompt"]:
            ctx.warnings.append("negative_prompt is ignored: Z-Image applies guidance only with guidance_scale > 0")
        return {"prompt_embeds": embeds, "prompt_mask": mask}
    negative = s["negative_prompt"] or ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    neg_embeds, neg_mask = _embed(ctx, negatives, max_length, "Qwen3 (negative prompt)")
    # one batch: conditional samples, then unconditional ones
    return {"prompt_embeds": torch.cat([embeds, neg_embeds]), "prompt_mask": torch.cat([mask, neg_mask])}


def latent_size(vae, height: int, width: int) -> tuple[int, int]:
    f = vae_scale_factor(vae)
    return 2 * (height // (f * 2)), 2 * (width // (f * 2))


def prepare_latents(ctx: RunContext, s):
    transformer, vae = ctx.components["transformer"], ctx.components["vae"]
    h, w = latent_size(vae, s["height"], s["width"])
    shape = (len(s["prompt"]), transformer.config.in_channels, h, w)
    # Z-Image keeps the latents in float32 whatever the DiT's dtype; the DiT gets a cast copy each step
    return {"latents": seeded_noise(shape, cpu_generators(s["seeds"]), torch.float32, ctx.device)}


def prepare_timesteps(ctx: RunContext, s):
    scheduler = ctx.components["scheduler"]
    n = s["num_inference_steps"]
    cfg = scheduler.config
    _, _, h, w = s["latents"].shape
    mu = calculate_shift((h // 2) * (w // 2), cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)
    sigmas = torch.linspace(1.0, 1 / n, n).tolist()
    scheduler.set_timesteps(n, device=ctx.device, sigmas=sigmas, mu=mu)
    return {"timesteps": scheduler.timesteps}


def denoise(ctx: RunContext, s):
    transformer = ctx.components["transformer"]
    scale = s["guidance_scale"]
    embeds, mask = s["prompt_embeds"], s["prompt_mask"]
    batch = s["latents"].shape[0]
    guided = embeds.shape[0] == 2 * batch
    # the caption lengths, read on the host once: the DiT's forward then reads nothing back (CUDA graphs)
    embeds, mask, padded = caption_layout(embeds, mask)

    def predict(x, t):
        x = x.to(ctx.dtype)
        if guided:
            x = torch.cat([x, x])
        timestep = ((1000 - t.expand(x.shape[0])) / 1000).to(torch.float32)
        out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                          encoder_attention_mask=mask, padded_caption_lengths=padded).float()
        if guided:
            cond, uncond = out.chunk(2)
            out = cond + scale * (cond - uncond)
        return -out

    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], s["latents"], s["timesteps"], predict)}


def decode(ctx: RunContext, s):
    vae = ctx.components["vae"]
    latents = s["latents"].to(next(vae.parameters()).dtype)
    return {"decoded": vae.decode(latents / vae.scaling_factor + vae.shift_factor)}


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, ("prompt", "negative_prompt", "guidance_scale", "max_sequence_length"),
              ("prompt_embeds", "prompt_mask")),
        Stage("prepare_latents", prepare_latents, ("prompt", "height", "width", "seeds"), ("latents",)),
        Stage("prepare_timesteps", prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "timesteps", "guidance_scale", "prompt_embeds", "prompt_mask"),
              ("latents",)),
        Stage("decode", decode, ("latents",), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("images",)),
    ]


def validate(pipe, request: GenerationRequest) -> None:
    c = pipe.components
    check_fit(pipe.spec.pipeline_class, [  # the Qwen3 encoder and the VAE fit the DiT (.fit)
        ("text_encoder's width (hidden_size)", setting(c["text_encoder"], "hidden_size"),
         "the transformer's cap_feat_dim", c["transformer"].config.cap_feat_dim),
        ("the vae's latent_channels", c["vae"].config.latent_channels,
         "the transformer's in_channels", c["transformer"].config.in_channels),
    ])
    multiple = 2 * vae_scale_factor(c["vae"])
    cfg = c["transformer"].config
    for field, axis in (("height", 1), ("width", 2)):
        value = getattr(request, field)
        if value % multiple:
            raise InvalidArgumentError(field, f"Z-Image needs a multiple of {multiple}, got {value} "
                                       f"(try {nearest_valid(value, multiple, 0, multiple)})")
        largest = cfg.axes_lens[axis] * multiple
        if value > largest:
            raise InvalidArgumentError(field, f"at most {largest} for this checkpoint (axes_lens), got {value}")
    check_time_shift(c["scheduler"], request.height, request.width, multiple ** 2)
    longest = min(MAX_TEXT_TOKENS, cfg.axes_lens[0] - 64)
    if request.max_sequence_length is None:  # diffusers' 512, or less where this checkpoint's caption axis is shorter
        request.max_sequence_length = min(MAX_SEQUENCE_LENGTH, longest)
    check_int("max_sequence_length", request.max_sequence_length, 1, longest)
    check_image_model_frames(request, "Z-Image")
    check_terminal_steps(c["scheduler"], request.num_inference_steps)


ZIMAGE_SPEC = PipelineSpec(
    family="zimage",
    pipeline_class="ZImagePipeline",
    output="image",
    components=("scheduler", "text_encoder", "tokenizer", "transformer", "vae"),
    # max_sequence_length defaults in validate: to MAX_SEQUENCE_LENGTH within what the checkpoint's axes_lens hold
    defaults={"height": 1024, "width": 1024, "num_inference_steps": 8, "guidance_scale": 0.0},
    build_stages=build_stages,
    validate=validate,
    uses_negative_prompt=True,
    prompt_shapes=True,
    prompt_tokens=prompt_tokens,
    prompt_multiple=SEQ_MULTI_OF,
)
