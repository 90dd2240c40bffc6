"""Qwen-Image-Edit (one input image) and Qwen-Image-Edit-2509 (several): image editing on the Qwen-Image DiT.

Stages: prepare_images -> encode_prompt -> prepare_latents -> prepare_timesteps -> denoise -> decode ->
postprocess. As diffusers' ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` do:

- each input image is resized (Lanczos) to about 1024x1024 pixels at its aspect ratio, multiples of 32,
  and VAE-encoded (the posterior's mean, normalised); its packed latents follow the generated image's in
  the DiT sequence (RoPE frames 1, 2, ...) and the DiT's prediction for them is dropped;
- the images also go into the Qwen2.5-VL prompt: Edit at the VAE size, Edit-2509 each at about 384x384
  ("Picture 1: ... Picture 2: ..." before the instruction);
- the output size follows the input image (the last one for Edit-2509) unless height/width are given.

A list of prompts edits the same input image(s) once per prompt (diffusers' Edit-2509 takes one prompt); each
sample is what a one-prompt request with its seed gives.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import InvalidArgumentError
from .base import GenerationRequest, PipelineSpec
from .images import input_images, resize_image
from .denoise import denoise_loop
from .flux import pack_latents, postprocess
from .qwen_image import (ENCODED, STAGE_INPUTS, DENOISE_INPUTS, cfg_warnings, check_size, decode, guided_predict,
                         latent_hw, negatives_for, noise_latents, prepare_timesteps)
from .qwen_vl import (EDIT_DROP, EDIT_PLUS_IMAGE, EDIT_PLUS_TEMPLATE, EDIT_TEMPLATE, condition_size, encode_texts,
                      pad_to_bucket)
from .stages import RunContext, Stage

VAE_IMAGE_AREA = 1024 * 1024
CONDITION_IMAGE_AREA = 384 * 384  # Edit-2509's vision-encoder input size
MAX_IMAGES_PLUS = 3  # Qwen-Image-Edit-2509 is trained on one to three input images


def _image_tensor(image: Image.Image, width: int, height: int, device, dtype) -> torch.Tensor:
    """(1, 3, 1, height, width) in [-1, 1]: diffusers' VaeImageProcessor resize + preprocess, then a frame axis."""
    return resize_image(image, height, width)[:, :, None].to(device=device, dtype=dtype)


def _plus(s) -> bool:
    return s["edit_variant"] == "plus"


def prepare_images(ctx: RunContext, s):
    """The vision-encoder images and the VAE image sizes, from the request's input images (RGB)."""
    images = s["image"] if isinstance(s["image"], list) else [s["image"]]
    vae_sizes = [condition_size(*im.size, VAE_IMAGE_AREA) for im in images]  # (width, height)
    if s["edit_variant"] == "plus":
        condition = [im.resize(condition_size(*im.size, CONDITION_IMAGE_AREA), resample=Image.LANCZOS)
                     for im in images]
    else:
        condition = [im.resize(size, resample=Image.LANCZOS) for im, size in zip(images, vae_sizes)]
    return {"condition_images": condition, "vae_sizes": vae_sizes}


def encode_prompt(ctx: RunContext, s):
    cfg_warnings(ctx, s)
    images = s["condition_images"]

    def texts(prompts):
        if _plus(s):
            pictures = "".join(EDIT_PLUS_IMAGE.format(i + 1) for i in range(len(images)))
            return [EDIT_PLUS_TEMPLATE.format(pictures + p) for p in prompts]
        return [EDIT_TEMPLATE.format(p) for p in prompts]

    prompts = s["prompt"]
    cond = encode_texts(ctx, texts(prompts), images * len(prompts), EDIT_DROP, None, "prompt")
    negatives = negatives_for(s)
    uncond = None
    if negatives is not None:
        uncond = encode_texts(ctx, texts(negatives), images * len(negatives), EDIT_DROP, None, "negative prompt")
    (embeds, mask), (neg_embeds, neg_mask) = pad_to_bucket(cond, uncond)
    return {"prompt_embeds": embeds, "prompt_mask": mask, "negative_prompt_embeds": neg_embeds,
            "negative_prompt_mask": neg_mask}


def prepare_latents(ctx: RunContext, s):
    """Noise for the output image, and each input image's normalised, packed VAE latents."""
    vae = ctx.components["vae"]
    dtype = s["prompt_embeds"].dtype
    images = s["image"] if isinstance(s["image"], list) else [s["image"]]
    batch = len(s["prompt"])
    packed, shapes = [], []
    for image, (w, h) in zip(images, s["vae_sizes"]):
        pixels = _image_tensor(image, w, h, ctx.device, dtype)
        mean, _ = vae.encode(pixels.to(next(vae.parameters()).dtype))
        latents = vae.normalize(mean.to(dtype))[:, :, 0]  # (1, C, h, w)
        packed.append(pack_latents(latents).expand(batch, -1, -1))
        shapes.append((1, latents.shape[2] // 2, latents.shape[3] // 2))
    lh, lw = latent_hw(vae, s["height"], s["width"])
    return {"latents": noise_latents(ctx, s, dtype), "image_latents": torch.cat(packed, dim=1),
            "img_shapes": ((1, lh // 2, lw // 2), *shapes)}


def denoise(ctx: RunContext, s):
    predict = guided_predict(ctx, s, condition=s["image_latents"])
    return {"latents": denoise_loop(ctx, ctx.components["scheduler"], s["latents"], s["timesteps"], predict)}


def build_stages(variant: str):
    def stages():
        return [
            Stage("prepare_images", lambda ctx, s: prepare_images(ctx, {**s, "edit_variant": variant}), ("image",),
                  ("condition_images", "vae_sizes")),
            Stage("encode_prompt", lambda ctx, s: encode_prompt(ctx, {**s, "edit_variant": variant}),
                  STAGE_INPUTS + ("condition_images",), ENCODED),
            Stage("prepare_latents", prepare_latents, ("prompt", "image", "vae_sizes", "height", "width", "seeds",
                                                       "prompt_embeds"), ("latents", "image_latents", "img_shapes")),
            Stage("prepare_timesteps", prepare_timesteps, ("latents", "num_inference_steps"), ("timesteps",)),
            Stage("denoise", denoise, DENOISE_INPUTS + ("image_latents",), ("latents",)),
            Stage("decode", decode, ("latents", "height", "width"), ("decoded",)),
            Stage("postprocess", postprocess, ("decoded",), ("images",)),
        ]

    return stages


MAX_ASPECT = 200  # the longer side over the shorter one that Qwen2.5-VL's image processor takes, exclusive


def validate(pipe, request: GenerationRequest) -> None:
    """Images as RGB; the output size from the (last) input image when not given; sizes as Qwen-Image's."""
    images = input_images(request)
    for i, image in enumerate(images):  # the Qwen2.5-VL image processor refuses more (transformers' smart_resize)
        w, h = image.size
        if max(w, h) / min(w, h) >= MAX_ASPECT:
            which = f" {i + 1}" if len(images) > 1 else ""
            raise InvalidArgumentError("image", f"image{which} is {w}x{h}: its aspect ratio is too extreme for "
                                                f"Qwen-Image-Edit's vision encoder (below {MAX_ASPECT}:1)")
    request.image = images if len(images) > 1 or pipe.spec.max_images > 1 else images[0]
    if request.height is None or request.width is None:
        multiple = 2 * pipe.components["vae"].spatial_compression_ratio
        w, h = condition_size(*images[-1].size, VAE_IMAGE_AREA)
        request.height = request.height or h // multiple * multiple
        request.width = request.width or w // multiple * multiple
    check_size(pipe, request)
    if request.max_sequence_length is not None:
        raise InvalidArgumentError("max_sequence_length", "Qwen-Image-Edit keeps the whole prompt (with its image "
                                   "tokens); leave max_sequence_length unset")


_EDIT_COMMON = dict(
    family="qwen_image",
    output="image",
    components=("scheduler", "text_encoder", "tokenizer", "processor", "transformer", "vae"),
    defaults={"num_inference_steps": 50},
    validate=validate,
    uses_negative_prompt=True,
    image_input="required",
    true_cfg=True,
    prompt_shapes=True,  # the prompt's states (after the input images' tokens) padded to a multiple of 128
)

QWEN_IMAGE_EDIT_SPEC = PipelineSpec(pipeline_class="QwenImageEditPipeline", build_stages=build_stages("edit"),
                                    max_images=1, **_EDIT_COMMON)
QWEN_IMAGE_EDIT_PLUS_SPEC = PipelineSpec(pipeline_class="QwenImageEditPlusPipeline",
                                         build_stages=build_stages("plus"), max_images=MAX_IMAGES_PLUS, **_EDIT_COMMON)
