"""Wan text-to-video: Wan2.1 (1.3B, 14B) and Wan2.2 T2V-A14B (two experts switched at ``boundary_ratio``),
with the UMT5 text encoder, the Wan DiT, the Wan causal video VAE.

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess.
The math, dtypes and tensor layouts follow diffusers' WanPipeline so the same seed gives the same
video; the one difference is that classifier-free guidance runs the conditional and unconditional
passes as one batched DiT forward per step instead of two.
"""

from __future__ import annotations

import html

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidArgumentError
from .base import GenerationRequest, PipelineSpec, check_int, nearest_valid
from .denoise import cpu_generators, denoise_loop, seeded_noise
from .stages import RunContext, Stage
from .text import tokenize

try:  # the `regex` module (a transformers dependency) is what Wan's own cleaning uses for \s
    import regex as re
except ImportError:  # pragma: no cover
    import re
try:  # Wan fixes mojibake with ftfy when it is installed; so does diffc, to stay identical
    import ftfy
except ImportError:
    ftfy = None

UMT5_MAX_LENGTH = 512


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed, as Wan does), HTML unescaping twice, whitespace runs to one space."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression of the Wan VAE, as its config declares them."""
    return vae.config.scale_factor_temporal, vae.config.scale_factor_spatial


def size_multiples(components) -> tuple[int, int]:
    """Height and width must be multiples of (spatial factor * patch height, spatial factor * patch width)."""
    _, spatial = vae_scale_factors(components["vae"])
    _, ph, pw = components["transformer"].config.patch_size
    return spatial * ph, spatial * pw


def latent_shape(components, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
    temporal, spatial = vae_scale_factors(components["vae"])
    channels = components["transformer"].config.in_channels
    return batch, channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def _embed(ctx: RunContext, prompts: list[str], max_length: int, label: str) -> torch.Tensor:
    """UMT5 states (B, max_length, d_model); positions past each prompt's own length are zero."""
    encoder = ctx.components["text_encoder"]
    ids, mask = tokenize(ctx, ctx.components["tokenizer"], [prompt_clean(p) for p in prompts], max_length, label)
    states = encoder(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device)).last_hidden_state
    states = states.to(dtype=encoder.dtype, device=ctx.device)
    lengths = mask.gt(0).sum(dim=1).to(ctx.device)  # (B,)
    keep = torch.arange(max_length, device=ctx.device)[None, :] < lengths[:, None]  # (B, L)
    return torch.where(keep[..., None], states, torch.zeros((), dtype=states.dtype, device=ctx.device))


def encode_prompt(ctx: RunContext, s):
    prompts, max_length = s["prompt"], s["max_sequence_length"]
    embeds = _embed(ctx, prompts, max_length, "UMT5").to(ctx.dtype)
    negative = s["negative_prompt"]
    if s["guidance_scale"] <= 1.0:
        if negative:
            ctx.warnings.append("negative_prompt is ignored: it only acts with guidance_scale > 1 "
                                f"(got {s['guidance_scale']})")
        return {"prompt_embeds": embeds, "negative_prompt_embeds": None}
    negative = negative or ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    negative_embeds = _embed(ctx, negatives, max_length, "UMT5 (negative prompt)").to(ctx.dtype)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}


def prepare_latents(ctx: RunContext, s):
    shape = latent_shape(ctx.components, len(s["prompt"]), s["height"], s["width"], s["num_frames"])
    # Wan keeps the latents in float32 whatever the DiT's dtype; the DiT gets a cast copy each step.
    return {"latents": seeded_noise(shape, cpu_generators(s["seeds"]), torch.float32, ctx.device)}


def prepare_timesteps(ctx: RunContext, s):
    scheduler = ctx.components["scheduler"]
    scheduler.set_timesteps(s["num_inference_steps"], device=ctx.device)
    return {"timesteps": scheduler.timesteps}


def experts(ctx: RunContext, s):
    """``(model, guidance scale)`` for a timestep. Wan2.2 A14B checkpoints hold two experts: ``transformer``
    denoises the timesteps at or above ``boundary_ratio * num_train_timesteps`` (high noise) with
    ``guidance_scale``, ``transformer_2`` the rest with ``guidance_scale_2`` (default: ``guidance_scale``).
    Without ``boundary_ratio`` only ``transformer`` runs, as in diffusers."""
    first, second = ctx.components["transformer"], ctx.components.get("transformer_2")
    scale = s["guidance_scale"]
    scale_2 = scale if s.get("guidance_scale_2") is None else s["guidance_scale_2"]
    ratio = ctx.config.get("boundary_ratio")
    if second is None or ratio is None:
        return lambda t: (first, scale)
    boundary = ratio * ctx.components["scheduler"].config.num_train_timesteps
    return lambda t: (first, scale) if float(t) >= boundary else (second, scale_2)


def wan_predictor(ctx: RunContext, s, condition: torch.Tensor | None = None,
                  image_embeds: torch.Tensor | None = None):
    """The Wan noise prediction for ``denoise_loop``. ``condition`` (I2V: mask and first-frame latents) is
    concatenated to the latents' channels, ``image_embeds`` (Wan2.1 I2V: CLIP image tokens) go to the
    image cross-attention. Guidance (on when ``guidance_scale > 1``, as diffusers decides it, for both
    experts) batches the conditional and unconditional passes into one forward."""
    cond, uncond = s["prompt_embeds"], s["negative_prompt_embeds"]
    text = cond if uncond is None else torch.cat([cond, uncond])  # (B or 2B, L, text_dim)
    extra = {}
    if image_embeds is not None:
        extra["encoder_hidden_states_image"] = image_embeds if uncond is None else torch.cat([image_embeds] * 2)
    expert = experts(ctx, s)

    def predict(x, t):
        transformer, scale = expert(t)
        x = (x if condition is None else torch.cat([x, condition], dim=1)).to(ctx.dtype)
        if uncond is None:
            return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text, **extra)
        both = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]),
                           encoder_hidden_states=text, **extra)  # (2B, C, F, H, W): conditional, then unconditional
        pred_cond, pred_uncond = both.chunk(2)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    return predict


def denoise(ctx: RunContext, s):
    predict = wan_predictor(ctx, s)
    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], s["latents"], s["timesteps"], predict)}


def decode(ctx: RunContext, s):
    vae = ctx.components["vae"]
    latents = s["latents"].to(next(vae.parameters()).dtype)
    # the causal VAE decodes one latent frame at a time: a bar (and ctx.decode_callback) follows it
    with tqdm(total=latents.shape[2], desc="decoding", unit="latent frame", disable=not ctx.progress,
              leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if ctx.decode_callback is not None:
                ctx.decode_callback(done, total)

        decoded = vae.decode(vae.denormalize(latents), progress=progress)
    return {"decoded": decoded}  # (B, 3, F, H, W) in [-1, 1]


def postprocess(ctx: RunContext, s):
    videos = []
    for video in s["decoded"]:  # (3, F, H, W)
        frames = (video.permute(1, 0, 2, 3) * 0.5 + 0.5).clamp(0, 1)  # (F, 3, H, W) in [0, 1]
        array = frames.cpu().permute(0, 2, 3, 1).float().numpy()
        videos.append((array * 255).round().astype("uint8"))  # (F, H, W, 3)
    return {"videos": videos}


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, ("prompt", "negative_prompt", "guidance_scale", "max_sequence_length"),
              ("prompt_embeds", "negative_prompt_embeds")),
        Stage("prepare_latents", prepare_latents, ("prompt", "height", "width", "num_frames", "seeds"), ("latents",)),
        Stage("prepare_timesteps", prepare_timesteps, ("num_inference_steps",), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "timesteps", "guidance_scale", "guidance_scale_2", "prompt_embeds",
                                   "negative_prompt_embeds"), ("latents",)),
        Stage("decode", decode, ("latents",), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("videos",)),
    ]


def validate(pipe, request: GenerationRequest) -> None:
    c = pipe.components
    temporal, _ = vae_scale_factors(c["vae"])
    patch = c["transformer"].config.patch_size
    rope_len = c["transformer"].config.rope_max_seq_len
    max_frames = (rope_len * patch[0] - 1) * temporal + 1
    n = request.num_frames
    check_int("num_frames", n, 1, max_frames)
    if (n - 1) % temporal:
        raise InvalidArgumentError("num_frames", f"Wan needs {temporal}k+1 frames (1, {1 + temporal}, "
                                   f"{1 + 2 * temporal}, ...), got {n} (nearest: {nearest_valid(n, temporal, 1)})")
    latent_frames = (n - 1) // temporal + 1
    if latent_frames % patch[0]:
        raise InvalidArgumentError("num_frames", f"{n} frames give {latent_frames} latent frames, which the DiT's "
                                   f"temporal patch size {patch[0]} does not divide")
    for field, multiple in zip(("height", "width"), size_multiples(c)):
        value = getattr(request, field)
        if value % multiple:
            raise InvalidArgumentError(field, f"Wan needs a multiple of {multiple}, got {value} "
                                       f"(nearest: {nearest_valid(value, multiple, 0, multiple)})")
        if value // multiple > rope_len:
            raise InvalidArgumentError(field, f"at most {rope_len * multiple} for this checkpoint "
                                       f"(rope_max_seq_len={rope_len}), got {value}")
    check_int("max_sequence_length", request.max_sequence_length, 1, UMT5_MAX_LENGTH)


def check_index(index: dict) -> None:
    """Refuse Wan2.2 TI2V-5B (``expand_timesteps``: the Wan2.2 VAE and per-token timesteps), which shares the
    pipeline classes but needs what these specs lack. Two experts (A14B) are supported."""
    if index.get("expand_timesteps"):
        raise CheckpointError("model_index.json: expand_timesteps (Wan2.2 TI2V-5B) is not supported yet; "
                              "Wan2.1 and the Wan2.2 A14B models are")
    ratio = index.get("boundary_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise CheckpointError(f"model_index.json: boundary_ratio must be a number in [0, 1], got {ratio!r}")


WAN_SPEC = PipelineSpec(
    family="wan",
    pipeline_class="WanPipeline",
    output="video",
    components=("scheduler", "text_encoder", "tokenizer", "transformer", "vae"),
    defaults={"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50, "guidance_scale": 5.0,
              "max_sequence_length": UMT5_MAX_LENGTH},
    build_stages=build_stages,
    validate=validate,
    uses_negative_prompt=True,
    check_index=check_index,
    optional_components=("transformer_2",),
    index_keys=("boundary_ratio",),
)
