"""Wan image-to-video: Wan2.1 I2V 14B (480P, 720P), Wan2.1 FLF2V (first and last frame) and Wan2.2 I2V-A14B
(two experts).

The input image becomes the video's first frame: it is resized to the video size, encoded by the Wan VAE
as the first frame of an otherwise black video, and the normalized latents, with a mask marking the
first frame, are concatenated to the noisy latents' channels at every step (16 + 4 + 16 = 36 input
channels for Wan2.1); with ``expand_timesteps`` (Wan2.2 TI2V-5B) they replace the first latent frame, at
timestep 0, instead. Wan2.1 I2V also encodes the image with its CLIP vision tower (the penultimate
layer's states) for the DiT's image cross-attention; Wan2.2 I2V-A14B has no image encoder. ``image=[first, last]``
(diffusers' ``last_image``) also fixes the last frame: it ends the VAE's conditioning video and the mask, and a
first-last-frame DiT (``pos_embed_seq_len``) reads both frames' CLIP tokens as one sequence.

Stages: encode_prompt -> encode_image -> prepare_latents -> prepare_timesteps -> denoise -> decode ->
postprocess. The math, dtypes and layouts follow diffusers' WanImageToVideoPipeline, so the same seed
gives the same video; as for text-to-video, guidance batches the conditional and unconditional passes.
"""

from __future__ import annotations

import dataclasses

from ..errors import CheckpointError, InvalidArgumentError
from . import wan
from .base import GenerationRequest, nearest_valid
from .stages import RunContext, Stage


VAE_ENCODE_CHUNK = 4  # frames the Wan VAE encoder reads at a time after the first


def encode_image(ctx: RunContext, s):
    """CLIP image tokens (B, L_img, image_dim) for a DiT with an image embedder (Wan2.1 I2V), else None."""
    encoder = ctx.components.get("image_encoder")
    if ctx.components["transformer"].config.image_dim is None:
        return {"image_embeds": None}
    if encoder is None or "image_processor" not in ctx.components:
        raise CheckpointError("this image-to-video DiT has an image embedder (image_dim) but the checkpoint has no "
                              "image_encoder / image_processor")
    last = wan.last_image(s)  # first-last-frame checkpoints: both frames' tokens, paired per sample by the DiT
    images = wan.first_image(s) if last is None else [wan.first_image(s), last]
    pixels = ctx.components["image_processor"](images=images, return_tensors="pt")["pixel_values"]
    states = encoder(pixel_values=pixels.to(ctx.device, encoder.dtype), output_hidden_states=True).hidden_states[-2]
    return {"image_embeds": states.to(ctx.device).repeat(len(s["prompt"]), 1, 1).to(ctx.dtype)}


def build_stages():
    return [
        Stage("encode_prompt", wan.encode_prompt,
              ("prompt", "negative_prompt", "guidance_scale", "max_sequence_length"),
              ("prompt_embeds", "negative_prompt_embeds")),
        Stage("encode_image", encode_image, ("prompt", "image"), ("image_embeds",)),
        Stage("prepare_latents", wan.prepare_latents, ("prompt", "image", "height", "width", "num_frames", "seeds"),
              ("latents", "condition")),
        Stage("prepare_timesteps", wan.prepare_timesteps, ("num_inference_steps",), ("timesteps",)),
        Stage("denoise", wan.denoise, ("latents", "condition", "image_embeds", "timesteps", "guidance_scale",
                                       "guidance_scale_2", "prompt_embeds", "negative_prompt_embeds"), ("latents",)),
        Stage("decode", wan.decode, ("latents",), ("decoded",)),
        Stage("postprocess", wan.postprocess, ("decoded",), ("videos",)),
    ]


def validate(pipe, request: GenerationRequest) -> None:
    c = pipe.components
    temporal, _ = wan.vae_scale_factors(c["vae"])
    z = c["vae"].config.z_dim
    want, what = (z, "latents") if pipe.config.get("expand_timesteps") else \
        (2 * z + temporal, "latents, mask, first-frame latents")
    for name in ("transformer", "transformer_2"):
        if name in c and c[name].config.in_channels != want:
            raise CheckpointError(f"{name}: this image-to-video Wan DiT should take {want} input channels ({what}), "
                                  f"it takes {c[name].config.in_channels}")
    wan.validate(pipe, request)
    check_last_frame(pipe, request)
    n = request.num_frames
    if not pipe.config.get("expand_timesteps") and (n - 1) % VAE_ENCODE_CHUNK:
        # the whole conditioning video goes through the VAE encoder, which reads it in chunks of 1 + 4 + 4 ... frames
        # (as diffusers' AutoencoderKLWan does), whatever the VAE's temporal compression
        raise InvalidArgumentError("num_frames", f"image-to-video encodes a video of num_frames frames with the Wan VAE, "
                                   f"which needs {VAE_ENCODE_CHUNK}k+1 frames (1, 5, 9, ...), got {n} "
                                   f"(nearest: {nearest_valid(n, VAE_ENCODE_CHUNK, 1)})")


def last_frame_input(pipe) -> tuple[str, str]:
    """Whether this checkpoint reads a last frame (``image=[first, last]``, diffusers' ``last_image``), and why:
    Wan2.1 FLF2V needs one (its DiT pairs the two frames' image tokens, ``pos_embed_seq_len``); a DiT without an
    image encoder (Wan2.2 I2V-A14B) takes one or not, seeing the frames through the VAE latents only; Wan2.1 I2V
    (one image's tokens) and ``expand_timesteps`` checkpoints take the first frame only."""
    dit = pipe.components["transformer"].config
    if dit.pos_embed_seq_len:
        return "required", "this first-last-frame checkpoint (pos_embed_seq_len) needs a first and a last frame"
    if pipe.config.get("expand_timesteps"):
        return "none", "this checkpoint (expand_timesteps) takes one image, the first frame"
    if dit.image_dim is not None:
        return "none", ("this checkpoint takes one image, the first frame: a last frame needs a first-last-frame "
                        "checkpoint (pos_embed_seq_len) or one without an image encoder (Wan2.2 I2V-A14B)")
    return "optional", "this checkpoint takes a first frame, and a last frame if given"


def check_last_frame(pipe, request: GenerationRequest) -> None:
    """``image=[first, last]`` where the checkpoint reads a last frame (:func:`last_frame_input`), and only there."""
    mode, why = last_frame_input(pipe)
    two = isinstance(request.image, list) and len(request.image) == 2
    if mode == "required" and not two:
        raise InvalidArgumentError("image", f"{why}: image=[first, last]")
    if not two:
        return
    if mode == "none":
        raise InvalidArgumentError("image", why)
    if request.num_frames < 2:
        raise InvalidArgumentError("num_frames", f"a first and a last frame need at least {1 + VAE_ENCODE_CHUNK} "
                                                 f"frames, got {request.num_frames}")


# Text-to-video's spec (defaults, components, index settings) with its own stages, validation and a required image.
WAN_I2V_SPEC = dataclasses.replace(
    wan.WAN_SPEC,
    pipeline_class="WanImageToVideoPipeline",
    build_stages=build_stages,
    validate=validate,
    image_input="required",
    max_images=2,  # the first frame, and a last frame where the checkpoint reads one (check_last_frame)
    last_frame=last_frame_input,
    optional_components=("image_encoder", "image_processor", "transformer_2"),
    for_config=None,
)
