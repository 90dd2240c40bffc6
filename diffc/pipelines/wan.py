"""Wan text-to-video: Wan2.1 (1.3B, 14B), Wan2.2 T2V-A14B (two experts switched at ``boundary_ratio``) and
Wan2.2 TI2V-5B (``expand_timesteps``: per-token timesteps, and an optional first frame), with the UMT5 text
encoder, the Wan DiT, the Wan causal video VAE. The stage functions also serve image-to-video (wan_i2v).

Stages: encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode -> postprocess.
The math, dtypes and tensor layouts follow diffusers' WanPipeline so the same seed gives the same
video; the one difference is that classifier-free guidance runs the conditional and unconditional
passes as one batched DiT forward per step instead of two.
"""

from __future__ import annotations

import dataclasses
import html

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidArgumentError
from .base import GenerationRequest, PipelineSpec, check_int, nearest_valid
from .images import input_images, resize_image
from .fit import check_fit, setting
from .denoise import check_terminal_steps, cpu_generators, denoise_loop, seeded_noise
from .stages import RunContext, Stage, check_finite, to_uint8
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


def first_image(s):
    """The request's input image (the first frame of image-to-video), or None."""
    image = s.get("image")
    return image[0] if isinstance(image, (list, tuple)) else image


def last_image(s):
    """The request's last frame (first-last-frame image-to-video: ``image=[first, last]``), or None."""
    image = s.get("image")
    return image[1] if isinstance(image, (list, tuple)) and len(image) > 1 else None


def image_latents(ctx: RunContext, image, batch: int, height: int, width: int, frames: int,
                  last=None) -> torch.Tensor:
    """(B, z_dim, T_lat, h, w) float32: the normalized posterior mode of ``image`` resized to the video size,
    followed by ``frames - 1`` black frames (``frames - 2`` and ``last`` when a last frame is given), as diffusers'
    Wan image-to-video pipeline encodes it."""
    vae = ctx.components["vae"]
    pixels = resize_image(image, height, width).to(ctx.device, torch.float32)  # (1, 3, H, W) in [-1, 1]
    parts = [pixels[:, :, None], pixels.new_zeros(1, 3, frames - 1 - (last is not None), height, width)]
    if last is not None:
        parts.append(resize_image(last, height, width).to(ctx.device, torch.float32)[:, :, None])
    mean, _logvar = vae.encode(torch.cat(parts, dim=2).to(next(vae.parameters()).dtype))
    return vae.normalize(mean.to(ctx.device, torch.float32)).repeat(batch, 1, 1, 1, 1)


def first_frame_mask(ctx: RunContext, batch: int, frames: int, h: int, w: int, last: bool = False) -> torch.Tensor:
    """(B, temporal, T_lat, h, w): ones on the first pixel frame (and the last one with ``last``), folded into
    latent frames as Wan does."""
    temporal, _ = vae_scale_factors(ctx.components["vae"])
    mask = torch.ones(batch, 1, frames, h, w)
    mask[:, :, 1:frames - 1 if last else frames] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    return torch.cat([first, mask[:, :, 1:]], dim=2).view(batch, -1, temporal, h, w).transpose(1, 2).to(ctx.device)


def prepare_latents(ctx: RunContext, s):
    """Noise, and with an input image the conditioning: Wan2.1 I2V / Wan2.2 I2V-A14B concatenate the first-frame
    mask and latents (with a last frame: the first and last frames' mask and latents) to the DiT's input channels;
    Wan2.2 TI2V (``expand_timesteps``) writes the image's latent frame over the first latent frame instead, at
    timestep 0."""
    vae, image, last = ctx.components["vae"], first_image(s), last_image(s)
    batch, height, width, frames = len(s["prompt"]), s["height"], s["width"], s["num_frames"]
    shape = latent_shape(ctx.components, batch, height, width, frames)
    if image is not None:
        shape = (batch, vae.config.z_dim, *shape[2:])
    # Wan keeps the latents in float32 whatever the DiT's dtype; the DiT gets a cast copy each step.
    latents = seeded_noise(shape, cpu_generators(s["seeds"]), torch.float32, ctx.device)
    condition = None
    if image is not None and ctx.config.get("expand_timesteps"):
        condition = image_latents(ctx, image, batch, height, width, 1)  # (B, z, 1, h, w)
    elif image is not None:
        mask = first_frame_mask(ctx, batch, frames, *shape[3:], last=last is not None)
        condition = torch.cat([mask, image_latents(ctx, image, batch, height, width, frames, last)], dim=1)
    return {"latents": latents, "condition": condition}


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
    scheduler = ctx.components["scheduler"]
    boundary = ratio * scheduler.config.num_train_timesteps
    # which expert each step takes, read once a generation: a read of ``t`` at every step would make the host
    # wait for the device there (``t`` is the schedule's entry at the scheduler's step index)
    high = [value >= boundary for value in s["timesteps"].tolist()] if "timesteps" in s else None

    def pick(t):
        i = scheduler.step_index
        is_high = high[i] if high is not None and i is not None and i < len(high) else float(t) >= boundary
        return (first, scale) if is_high else (second, scale_2)

    return pick


def token_mask(ctx: RunContext, mask: torch.Tensor) -> torch.Tensor:
    """(tokens,): the latent mask (1, 1, T_lat, h, w) at one value per DiT patch, as Wan2.2 TI2V's per-token
    timesteps use it (0 on a given first frame, 1 where the latents are denoised)."""
    _, ph, pw = ctx.components["transformer"].config.patch_size
    return mask[0, 0][:, ::ph, ::pw].flatten()


def wan_predictor(ctx: RunContext, s, condition: torch.Tensor | None = None,
                  image_embeds: torch.Tensor | None = None):
    """The Wan noise prediction for ``denoise_loop``, and the first-frame latent mask of ``expand_timesteps``
    (None without). ``condition`` (image-to-video) is concatenated to the
    latents' channels (mask and first-frame latents), or with ``expand_timesteps`` (Wan2.2 TI2V) replaces
    the first latent frame, which then gets timestep 0; ``image_embeds`` (Wan2.1 I2V: CLIP image tokens) go
    to the image cross-attention. Guidance (on when ``guidance_scale > 1``, as diffusers decides it, for
    both experts) batches the conditional and unconditional passes into one forward."""
    cond, uncond = s["prompt_embeds"], s["negative_prompt_embeds"]
    text = cond if uncond is None else torch.cat([cond, uncond])  # (B or 2B, L, text_dim)
    extra = {}
    if image_embeds is not None:
        extra["encoder_hidden_states_image"] = image_embeds if uncond is None else torch.cat([image_embeds] * 2)
    expert = experts(ctx, s)
    expand = bool(ctx.config.get("expand_timesteps"))
    mask = tokens = None
    if expand:
        mask = torch.ones(1, 1, *s["latents"].shape[2:], device=ctx.device)
        if condition is not None:
            mask[:, :, 0] = 0
        tokens = token_mask(ctx, mask)

    def predict(x, t):
        transformer, scale = expert(t)
        if expand:
            if condition is not None:
                x = (1 - mask) * condition + mask * x
            timestep = (tokens * t)[None].expand(x.shape[0], -1)  # (B, tokens)
        else:
            if condition is not None:
                x = torch.cat([x, condition], dim=1)
            timestep = t.expand(x.shape[0])
        x = x.to(ctx.dtype)
        if uncond is None:
            return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text, **extra)
        both = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                           encoder_hidden_states=text, **extra)  # (2B, C, F, H, W): conditional, then unconditional
        pred_cond, pred_uncond = both.chunk(2)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    return predict, mask


def denoise(ctx: RunContext, s):
    condition = s.get("condition")
    predict, mask = wan_predictor(ctx, s, condition, s.get("image_embeds"))
    latents = denoise_loop(ctx, ctx.components["scheduler"], s["latents"], s["timesteps"], predict)
    if mask is not None and condition is not None:  # Wan2.2 TI2V: the given first frame, exactly
        latents = (1 - mask) * condition + mask * latents
    return {"latents": latents}


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
    check_finite(ctx, s["decoded"])
    videos = []
    for video in s["decoded"]:  # (3, F, H, W)
        frames = (video.permute(1, 0, 2, 3) * 0.5 + 0.5).clamp(0, 1)  # (F, 3, H, W) in [0, 1]
        videos.append(to_uint8(frames))  # (F, H, W, 3)
    return {"videos": videos}


def build_stages():
    return [
        Stage("encode_prompt", encode_prompt, ("prompt", "negative_prompt", "guidance_scale", "max_sequence_length"),
              ("prompt_embeds", "negative_prompt_embeds")),
        Stage("prepare_latents", prepare_latents, ("prompt", "image", "height", "width", "num_frames", "seeds"),
              ("latents", "condition")),
        Stage("prepare_timesteps", prepare_timesteps, ("num_inference_steps",), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "condition", "timesteps", "guidance_scale", "guidance_scale_2",
                                   "prompt_embeds", "negative_prompt_embeds"), ("latents",)),
        Stage("decode", decode, ("latents",), ("decoded",)),
        Stage("postprocess", postprocess, ("decoded",), ("videos",)),
    ]


def check_components(pipe) -> None:
    """UMT5, the VAE (and the image encoder) fit the DiT(s) (:mod:`.fit`)."""
    c = pipe.components
    c["vae"].check_latent_stats()  # read only at the decode otherwise, after the whole denoising
    z = c["vae"].config.z_dim
    for name in ("transformer", "transformer_2"):
        if name not in c:
            continue
        dit = c[name].config
        pairs = [("text_encoder's width (d_model)", setting(c["text_encoder"], "d_model"),
                  f"the {name}'s text_dim", dit.text_dim),
                 (f"the {name}'s out_channels", dit.out_channels, "the vae's z_dim", z)]
        if dit.image_dim is not None and "image_encoder" in c:
            pairs.append(("image_encoder's width (hidden_size)", setting(c["image_encoder"], "hidden_size"),
                          f"the {name}'s image_dim", dit.image_dim))
        if pipe.spec.pipeline_class == "WanPipeline":  # image-to-video checks its own input channels
            pairs.append((f"the {name}'s in_channels", dit.in_channels, "the vae's z_dim", z))
        check_fit(pipe.spec.pipeline_class, pairs)


def validate(pipe, request: GenerationRequest) -> None:
    c = pipe.components
    check_components(pipe)
    check_terminal_steps(c["scheduler"], request.num_inference_steps)
    if request.image is not None:  # the frames as 8-bit RGB before any resize (16-bit greyscale scaled, a palette
        images = input_images(request)  # image resized as RGB, not by its palette indices)
        request.image = images[0] if len(images) == 1 else images
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
    """Refuse malformed Wan2.2 settings (``boundary_ratio``, ``expand_timesteps``) by name."""
    if not isinstance(index.get("expand_timesteps", False), bool):
        raise CheckpointError(f"model_index.json: expand_timesteps must be true or false, "
                              f"got {index['expand_timesteps']!r}")
    ratio = index.get("boundary_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise CheckpointError(f"model_index.json: boundary_ratio must be a number in [0, 1], got {ratio!r}")


def for_config(config: dict) -> PipelineSpec:
    """Wan2.2 TI2V-5B (``expand_timesteps``) is text-to-video and, given a first frame, image-to-video in one
    ``WanPipeline`` checkpoint, 1280x704 x 121 frames by default; other ``WanPipeline`` checkpoints take no image."""
    if not config.get("expand_timesteps"):
        return WAN_SPEC
    return dataclasses.replace(WAN_SPEC, image_input="optional", for_config=None,
                               defaults={**WAN_SPEC.defaults, "height": 704, "width": 1280, "num_frames": 121})


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
    index_keys=("boundary_ratio", "expand_timesteps"),
    for_config=for_config,
)
