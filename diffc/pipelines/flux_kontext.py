"""FLUX.1 Kontext image editing: the FLUX DiT with the input image's latent tokens appended to the sequence.

Stages: encode_prompt -> encode_image -> prepare_latents -> prepare_timesteps -> denoise -> decode ->
postprocess. As diffusers' FluxKontextPipeline: the input image is resized to the Kontext resolution
nearest its aspect ratio (:data:`PREFERRED_RESOLUTIONS`, ~1 MP), encoded by the VAE (the posterior's mean,
shifted and scaled), packed into 2x2 tokens with position ids ``(1, row, column)`` (the generated image's
are ``(0, row, column)``), appended after the noisy tokens at every step, and the DiT's prediction for
them is dropped. The output size is the resized input's unless ``height``/``width`` are given.
Without an input image it is plain FLUX text-to-image. True CFG (``true_cfg_scale`` + negative prompt)
works as in FLUX.1-dev.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from . import flux
from .base import GenerationRequest, PipelineSpec
from .images import input_images, resize_image
from .denoise import denoise_loop
from .stages import RunContext, Stage

# (width, height) pairs Kontext was trained at: diffusers' PREFERRED_KONTEXT_RESOLUTIONS (from BFL's reference)
PREFERRED_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def conditioning_size(image, multiple: int, resolutions=None) -> tuple[int, int]:
    """(height, width) the input image is resized to: the preferred resolution whose aspect ratio is nearest
    the image's (the first on a tie, as diffusers' ``min``), floored to ``multiple``."""
    resolutions = PREFERRED_RESOLUTIONS if resolutions is None else resolutions
    width, height = image.size
    width, height = width - width % multiple, height - height % multiple  # get_default_height_width
    aspect = width / height
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in resolutions)
    return height // multiple * multiple, width // multiple * multiple


def encode_image(ctx: RunContext, s):
    """The input image's packed latents (B, tokens, 4C) and position ids, or None without an image."""
    image = s["image"]
    image = image[0] if isinstance(image, (list, tuple)) else image
    if image is None:
        return {"image_latents": None, "image_ids": None}
    vae = ctx.components["vae"]
    multiple = 2 * flux.vae_scale_factor(vae)
    height, width = conditioning_size(image, multiple)
    pixels = resize_image(image, height, width).to(device=ctx.device, dtype=ctx.dtype)
    mean, _ = vae.encode(pixels.to(next(vae.parameters()).dtype))  # the posterior's mode ("argmax")
    latents = ((mean - vae.shift_factor) * vae.scaling_factor).to(ctx.dtype)
    ids = flux.latent_image_ids(latents.shape[2] // 2, latents.shape[3] // 2, ctx.device, ctx.dtype)
    ids[:, 0] = 1
    packed = flux.pack_latents(latents).expand(len(s["prompt"]), -1, -1)
    return {"image_latents": packed, "image_ids": ids}


def denoise(ctx: RunContext, s):
    latents, image_latents = s["latents"], s["image_latents"]
    img_ids = s["img_ids"] if image_latents is None else torch.cat([s["img_ids"], s["image_ids"]])
    predict = flux.flux_predictor(ctx, s, latents.shape[0], image_latents, img_ids)
    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], latents, s["timesteps"], predict)}


def build_stages():
    return [
        Stage("encode_prompt", flux.encode_prompt, flux.ENCODE_INPUTS, flux.ENCODE_OUTPUTS),
        Stage("encode_image", encode_image, ("image", "prompt"), ("image_latents", "image_ids")),
        Stage("prepare_latents", flux.prepare_latents, ("prompt", "height", "width", "seeds"), ("latents", "img_ids")),
        Stage("prepare_timesteps", flux.prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
        Stage("denoise", denoise, ("latents", "timesteps", "img_ids", "image_latents", "image_ids")
              + flux.DENOISE_INPUTS, ("latents",)),
        Stage("decode", flux.decode, ("latents", "height", "width"), ("decoded",)),
        Stage("postprocess", flux.postprocess, ("decoded",), ("images",)),
    ]


def validate(pipe, request: GenerationRequest) -> None:
    """The FLUX checks, after the output size defaults to the input image's conditioning size."""
    images = input_images(request)  # 8-bit RGB (16-bit greyscale scaled, not clipped by the encoder's convert)
    request.image = images[0] if images else None
    multiple = 2 * flux.vae_scale_factor(pipe.components["vae"])
    if images:
        w, h = images[0].size
        if w < multiple or h < multiple:
            raise InvalidArgumentError("image", f"is {w}x{h}; Kontext needs at least {multiple} pixels a side")
        size = conditioning_size(images[0], multiple)
    else:
        size = (KONTEXT_DEFAULT_SIZE, KONTEXT_DEFAULT_SIZE)
    if request.height is None:
        request.height = size[0]
    if request.width is None:
        request.width = size[1]
    flux.validate(pipe, request)


KONTEXT_DEFAULT_SIZE = 1024

FLUX_KONTEXT_SPEC = PipelineSpec(
    family="flux",
    pipeline_class="FluxKontextPipeline",
    output="image",
    components=flux.FLUX_SPEC.components,
    defaults={"num_inference_steps": 28, "guidance_scale": 2.5, "max_sequence_length": flux.T5_MAX_LENGTH},
    build_stages=build_stages,
    validate=validate,
    uses_negative_prompt=True,
    true_cfg=True,
    image_input="optional",
    max_images=1,
)
