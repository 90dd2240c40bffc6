"""What differs between model families in the benchmark: classes, DiT inputs, latent shapes, call arguments.

Each family is one ``Family`` entry of plain functions; the harness never branches on a family name.
DiT inputs have exactly the shapes and dtypes the pipelines pass at each denoising step (batch 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from diffc.pipelines.flux import latent_image_ids

from .flops import (Flops, flux_dit_flops, hunyuan_video_dit_flops, qwen_image_dit_flops, sd3_dit_flops,
                    wan_dit_flops, zimage_dit_flops)
from .specs import BenchSpec, Workload

INPUT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    diffusers_pipeline: str
    diffusers_transformer: str
    diffusers_vae: str
    native_transformer: str | None  # diffc registry name (= diffusers class name); None: the generic backend
    native_vae: str | None  # (diffc runs the diffusers pipeline itself, the same modules)
    latent_shape: Callable[[BenchSpec, Workload], tuple[int, ...]]  # raw VAE latents (batch 1)
    dit_inputs: Callable[[BenchSpec, Workload, torch.device, torch.dtype], dict[str, Any]]
    dit_flops: Callable[[BenchSpec, Workload], Flops]  # one batch-1 forward
    forwards_per_step: Callable[[Workload], int]  # batch-1 forwards' worth of work per denoising step
    call_kwargs: Callable[[Workload], dict[str, Any]]  # shared by diffusers' __call__ and diffc's generate
    diffusers_encode: Callable[[Any, Workload], Any]
    diffusers_output: Callable[[Any], np.ndarray]  # pipeline output -> uint8 array of the first sample
    diffc_output: Callable[[Any], np.ndarray]
    note: str = ""  # how the engines' steps differ, for the report
    diffc_encode: Callable[[Any, Workload], Any] | None = None  # diffc's text encode (None: its encode_prompt stage)
    # diffusers' DiT called on diffc's DiT inputs (None: the same keyword call); returns diffc's output layout
    diffusers_forward: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None
    e2e: bool = True  # False: only the DiT forward and the VAE are compared (no end-to-end pipeline run yet)
    warmup_steps: int = 1  # steps of the warm-up generation (a sampler with shift_terminal needs 2)


def _randn(shape, gen, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.asarray(array, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- FLUX


def _flux_latent_hw(spec: BenchSpec, wl: Workload) -> tuple[int, int]:
    f = 2 ** (len(spec.vae.block_out_channels) - 1)
    return 2 * (wl.height // (f * 2)), 2 * (wl.width // (f * 2))


def _flux_latent_shape(spec: BenchSpec, wl: Workload) -> tuple[int, ...]:
    return (1, spec.vae.latent_channels, *_flux_latent_hw(spec, wl))


def _flux_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
    h, w = _flux_latent_hw(spec, wl)
    seq_img, seq_txt = (h // 2) * (w // 2), wl.max_sequence_length
    inputs = {
        "hidden_states": _randn((1, seq_img, cfg.in_channels), gen, device, dtype),
        "encoder_hidden_states": _randn((1, seq_txt, cfg.joint_attention_dim), gen, device, dtype),
        "pooled_projections": _randn((1, cfg.pooled_projection_dim), gen, device, dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_ids": latent_image_ids(h // 2, w // 2, device, dtype),
        "txt_ids": torch.zeros(seq_txt, 3, device=device, dtype=dtype),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), float(wl.guidance_scale), device=device, dtype=torch.float32)
    return inputs


def _flux_flops(spec: BenchSpec, wl: Workload) -> Flops:
    h, w = _flux_latent_hw(spec, wl)
    return flux_dit_flops(spec.transformer, 1, (h // 2) * (w // 2), wl.max_sequence_length)


def _flux_kwargs(wl: Workload) -> dict[str, Any]:
    return dict(height=wl.height, width=wl.width, num_inference_steps=wl.steps, guidance_scale=wl.guidance_scale,
                max_sequence_length=wl.max_sequence_length)


def _flux_encode(pipe, wl: Workload):
    return pipe.encode_prompt(prompt=wl.prompt, prompt_2=None, device=pipe._execution_device,
                              max_sequence_length=wl.max_sequence_length)


FLUX = Family(
    name="flux", diffusers_pipeline="FluxPipeline", diffusers_transformer="FluxTransformer2DModel",
    diffusers_vae="AutoencoderKL", native_transformer="FluxTransformer2DModel", native_vae="AutoencoderKL",
    latent_shape=_flux_latent_shape, dit_inputs=_flux_inputs, dit_flops=_flux_flops,
    forwards_per_step=lambda wl: 1, call_kwargs=_flux_kwargs, diffusers_encode=_flux_encode,
    diffusers_output=lambda out: _to_uint8(out.images[0]),  # (H, W, 3)
    diffc_output=lambda out: np.asarray(out.images[0]),
)


# ------------------------------------------------------------------------------------------ Wan


def _wan_latent_shape(spec: BenchSpec, wl: Workload) -> tuple[int, ...]:
    t, s = spec.vae.scale_factor_temporal, spec.vae.scale_factor_spatial
    return (1, spec.vae.z_dim, (wl.num_frames - 1) // t + 1, wl.height // s, wl.width // s)


def _wan_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
    _, _, f, h, w = _wan_latent_shape(spec, wl)
    return {
        "hidden_states": _randn((1, cfg.in_channels, f, h, w), gen, device, dtype),
        "timestep": torch.full((1,), 500, device=device, dtype=torch.int64),  # the schedulers' int64 timesteps
        "encoder_hidden_states": _randn((1, wl.max_sequence_length, cfg.text_dim), gen, device, dtype),
    }


def _wan_flops(spec: BenchSpec, wl: Workload) -> Flops:
    _, _, f, h, w = _wan_latent_shape(spec, wl)
    return wan_dit_flops(spec.transformer, 1, f, h, w, wl.max_sequence_length)


def _wan_kwargs(wl: Workload) -> dict[str, Any]:
    return dict(height=wl.height, width=wl.width, num_frames=wl.num_frames, num_inference_steps=wl.steps,
                guidance_scale=wl.guidance_scale, max_sequence_length=wl.max_sequence_length,
                negative_prompt=wl.negative_prompt)


def _wan_encode(pipe, wl: Workload):
    return pipe.encode_prompt(prompt=wl.prompt, negative_prompt=wl.negative_prompt,
                              do_classifier_free_guidance=wl.guidance_scale > 1.0,
                              max_sequence_length=wl.max_sequence_length, device=pipe._execution_device)


WAN = Family(
    name="wan", diffusers_pipeline="WanPipeline", diffusers_transformer="WanTransformer3DModel",
    diffusers_vae="AutoencoderKLWan", native_transformer="WanTransformer3DModel", native_vae="AutoencoderKLWan",
    latent_shape=_wan_latent_shape, dit_inputs=_wan_inputs, dit_flops=_wan_flops,
    forwards_per_step=lambda wl: 2 if wl.guidance_scale > 1.0 else 1,  # conditional + unconditional
    call_kwargs=_wan_kwargs, diffusers_encode=_wan_encode,
    diffusers_output=lambda out: _to_uint8(out.frames[0]),  # (F, H, W, 3)
    diffc_output=lambda out: np.asarray(out.videos[0]),
    note="With guidance, diffusers runs the conditional and unconditional DiT passes as two batch-1 forwards "
         "per step, diffc as one batch-2 forward; the DiT forward row is batch 1 for both.",
)


# Wan2.1 I2V: the DiT takes 36 channels (latents, first-frame mask and latents) and CLIP ViT-H/14 image tokens
# (257 at 224 px, 1280 wide) besides the text; the FLOP count leaves out the image cross-attention (< 1 %).
CLIP_IMAGE_TOKENS = 257


def _wan_i2v_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    inputs = _wan_inputs(spec, wl, device, dtype)
    gen = torch.Generator("cpu").manual_seed(INPUT_SEED + 1)
    inputs["encoder_hidden_states_image"] = _randn((1, CLIP_IMAGE_TOKENS, spec.transformer.image_dim), gen, device,
                                                   dtype)
    return inputs


def _wan_ti2v_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Wan2.2 TI2V: one timestep per token (the first latent frame's tokens at 0, as with an input image)."""
    inputs = _wan_inputs(spec, wl, device, dtype)
    _, _, f, h, w = _wan_latent_shape(spec, wl)
    _, ph, pw = spec.transformer.patch_size
    per_frame = (h // ph) * (w // pw)
    timestep = torch.full((1, f * per_frame), 500, device=device, dtype=torch.float32)
    timestep[:, :per_frame] = 0
    inputs["timestep"] = timestep
    return inputs


WAN_TI2V = dataclasses.replace(
    WAN, name="wan-ti2v", dit_inputs=_wan_ti2v_inputs, e2e=False,
    note="The Wan2.2 TI2V DiT with per-token timesteps (the first latent frame at 0, as with an input image). "
         "the end-to-end run is not in this harness yet")


WAN_I2V = dataclasses.replace(
    WAN, name="wan-i2v", diffusers_pipeline="WanImageToVideoPipeline", dit_inputs=_wan_i2v_inputs, e2e=False,
    note="The image-to-video DiT (36 input channels, CLIP image tokens in cross-attention) at the spec's size. "
         "the end-to-end image-to-video run is not in this harness yet (it needs the CLIP vision tower built at "
         "real size)")


# ------------------------------------------------------------------- generic (diffusers) backend


def _sd3_latent_shape(spec: BenchSpec, wl: Workload) -> tuple[int, ...]:
    f = 2 ** (len(spec.vae.block_out_channels) - 1)
    return 1, spec.vae.latent_channels, wl.height // f, wl.width // f


def _sd3_seq_txt(wl: Workload) -> int:
    return 77 + wl.max_sequence_length  # CLIP's 77 tokens, then T5's


def _sd3_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
    return {
        "hidden_states": _randn(_sd3_latent_shape(spec, wl), gen, device, dtype),
        "encoder_hidden_states": _randn((1, _sd3_seq_txt(wl), cfg.joint_attention_dim), gen, device, dtype),
        "pooled_projections": _randn((1, cfg.pooled_projection_dim), gen, device, dtype),
        "timestep": torch.full((1,), 500.0, device=device, dtype=dtype),
    }


def _sd3_flops(spec: BenchSpec, wl: Workload) -> Flops:
    _, _, h, w = _sd3_latent_shape(spec, wl)
    p = spec.transformer.patch_size
    return sd3_dit_flops(spec.transformer, 1, (h // p) * (w // p), _sd3_seq_txt(wl))


def _sd3_encode(pipe, wl: Workload):
    return pipe.encode_prompt(prompt=wl.prompt, prompt_2=None, prompt_3=None, device=pipe._execution_device,
                              do_classifier_free_guidance=wl.guidance_scale > 1.0,
                              negative_prompt=wl.negative_prompt, max_sequence_length=wl.max_sequence_length)


def _generic_kwargs(wl: Workload) -> dict[str, Any]:
    kwargs = dict(height=wl.height, width=wl.width, num_frames=wl.num_frames, num_inference_steps=wl.steps,
                  guidance_scale=wl.guidance_scale, max_sequence_length=wl.max_sequence_length,
                  negative_prompt=wl.negative_prompt)
    return {k: v for k, v in kwargs.items() if v is not None}


SD3 = Family(
    name="sd3", diffusers_pipeline="StableDiffusion3Pipeline", diffusers_transformer="SD3Transformer2DModel",
    diffusers_vae="AutoencoderKL", native_transformer=None, native_vae=None,
    latent_shape=_sd3_latent_shape, dit_inputs=_sd3_inputs, dit_flops=_sd3_flops,
    forwards_per_step=lambda wl: 2 if wl.guidance_scale > 1.0 else 1,  # CFG as one batch-2 forward, both engines
    call_kwargs=_generic_kwargs, diffusers_encode=_sd3_encode,
    diffusers_output=lambda out: _to_uint8(out.images[0]), diffc_output=lambda out: np.asarray(out.images[0]),
    diffc_encode=lambda pipe, wl: _sd3_encode(pipe.diffusers_pipe, wl),
    note="diffc runs StableDiffusion3Pipeline on its generic (diffusers) backend: the same modules and call, "
         "so diffc-eager measures diffc's wrapping and diffc-compiled what its compiler adds.",
)


def _hunyuan_latent_shape(spec: BenchSpec, wl: Workload) -> tuple[int, ...]:
    t, s = spec.vae.temporal_compression_ratio, spec.vae.spatial_compression_ratio
    return 1, spec.vae.latent_channels, (wl.num_frames - 1) // t + 1, wl.height // s, wl.width // s


def _hunyuan_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
    return {
        "hidden_states": _randn(_hunyuan_latent_shape(spec, wl), gen, device, dtype),
        "timestep": torch.full((1,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": _randn((1, wl.max_sequence_length, cfg.text_embed_dim), gen, device, dtype),
        "encoder_attention_mask": torch.ones(1, wl.max_sequence_length, device=device, dtype=torch.int64),
        "pooled_projections": _randn((1, cfg.pooled_projection_dim), gen, device, dtype),
        "guidance": torch.full((1,), 1000.0 * wl.guidance_scale, device=device, dtype=dtype),
    }


def _hunyuan_flops(spec: BenchSpec, wl: Workload) -> Flops:
    _, _, f, h, w = _hunyuan_latent_shape(spec, wl)
    return hunyuan_video_dit_flops(spec.transformer, 1, f, h, w, wl.max_sequence_length)


def _hunyuan_encode(pipe, wl: Workload):
    return pipe.encode_prompt(prompt=wl.prompt, prompt_2=None, device=pipe._execution_device,
                              max_sequence_length=wl.max_sequence_length)


HUNYUAN_VIDEO = Family(
    name="hunyuanvideo", diffusers_pipeline="HunyuanVideoPipeline",
    diffusers_transformer="HunyuanVideoTransformer3DModel", diffusers_vae="AutoencoderKLHunyuanVideo",
    native_transformer=None, native_vae=None,
    latent_shape=_hunyuan_latent_shape, dit_inputs=_hunyuan_inputs, dit_flops=_hunyuan_flops,
    forwards_per_step=lambda wl: 1,  # guidance is embedded (distilled), no unconditional pass
    call_kwargs=_generic_kwargs, diffusers_encode=_hunyuan_encode,
    diffusers_output=lambda out: _to_uint8(out.frames[0]), diffc_output=lambda out: np.asarray(out.videos[0]),
    diffc_encode=lambda pipe, wl: _hunyuan_encode(pipe.diffusers_pipe, wl),
    note="diffc runs HunyuanVideoPipeline on its generic (diffusers) backend: the same modules and call.",
)

# ------------------------------------------------------------------------------- FLUX.1 Kontext


def kontext_input_image(wl: Workload):
    """The edit's input image: a smooth gradient with noise at the output size (Kontext keeps that size when it is
    one of its preferred resolutions, e.g. 1024x1024)."""
    from PIL import Image

    gen = np.random.default_rng(INPUT_SEED)
    ramp = np.linspace(0, 255, wl.width, dtype=np.float32)[None, :, None] * np.ones((wl.height, 1, 3), np.float32)
    noisy = ramp + gen.normal(0, 20, (wl.height, wl.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _kontext_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    inputs = _flux_inputs(spec, wl, device, dtype)
    gen = torch.Generator("cpu").manual_seed(INPUT_SEED + 7)
    image_ids = inputs["img_ids"].clone()
    image_ids[:, 0] = 1  # the input image's tokens: the same grid, first axis 1
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"],
                                         _randn(inputs["hidden_states"].shape, gen, device, dtype)], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], image_ids])
    return inputs


def _kontext_flops(spec: BenchSpec, wl: Workload) -> Flops:
    h, w = _flux_latent_hw(spec, wl)
    return flux_dit_flops(spec.transformer, 1, 2 * (h // 2) * (w // 2), wl.max_sequence_length)


def _kontext_kwargs(wl: Workload) -> dict[str, Any]:
    return dict(_flux_kwargs(wl), image=kontext_input_image(wl))


FLUX_KONTEXT = dataclasses.replace(
    FLUX, name="flux-kontext", diffusers_pipeline="FluxKontextPipeline", dit_inputs=_kontext_inputs,
    dit_flops=_kontext_flops, call_kwargs=_kontext_kwargs,
    note="Kontext appends the input image's latent tokens to the sequence: the DiT runs on twice the image tokens.")


# ------------------------------------------------------------------------------------------ Z-Image

ZIMAGE_CAPTION_TOKENS = 128  # caption tokens of the DiT-forward row (a ~100-token prompt in the chat template)


def _zimage_inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
    return {
        "hidden_states": _randn(_flux_latent_shape(spec, wl), gen, device, dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch.float32),
        "encoder_hidden_states": _randn((1, ZIMAGE_CAPTION_TOKENS, cfg.cap_feat_dim), gen, device, dtype),
    }


def _zimage_diffusers_forward(transformer, inputs: dict[str, Any]) -> torch.Tensor:
    """diffusers' ZImageTransformer2DModel takes lists: (C, 1, H, W) latents and (L, D) captions per sample."""
    x, caps = inputs["hidden_states"], inputs["encoder_hidden_states"]
    out = transformer(list(x.unsqueeze(2).unbind(0)), inputs["timestep"], list(caps.unbind(0)), return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def _zimage_flops(spec: BenchSpec, wl: Workload) -> Flops:
    h, w = _flux_latent_hw(spec, wl)
    p = spec.transformer.patch_size
    n_img = (h // p) * (w // p)
    return zimage_dit_flops(spec.transformer, 1, -(-n_img // 32) * 32, ZIMAGE_CAPTION_TOKENS)


def _zimage_kwargs(wl: Workload) -> dict[str, Any]:
    kwargs = dict(height=wl.height, width=wl.width, num_inference_steps=wl.steps, guidance_scale=wl.guidance_scale,
                  max_sequence_length=wl.max_sequence_length)
    if wl.guidance_scale > 0 and wl.negative_prompt is not None:
        kwargs["negative_prompt"] = wl.negative_prompt
    return kwargs


def _zimage_encode(pipe, wl: Workload):
    return pipe.encode_prompt(prompt=wl.prompt, device=pipe._execution_device,
                              do_classifier_free_guidance=wl.guidance_scale > 0,
                              negative_prompt=wl.negative_prompt, max_sequence_length=wl.max_sequence_length)


ZIMAGE = Family(
    name="zimage", diffusers_pipeline="ZImagePipeline", diffusers_transformer="ZImageTransformer2DModel",
    diffusers_vae="AutoencoderKL", native_transformer="ZImageTransformer2DModel", native_vae="AutoencoderKL",
    latent_shape=_flux_latent_shape, dit_inputs=_zimage_inputs, dit_flops=_zimage_flops,
    forwards_per_step=lambda wl: 2 if wl.guidance_scale > 0 else 1,  # CFG as one batch-2 forward, both engines
    call_kwargs=_zimage_kwargs, diffusers_encode=_zimage_encode,
    diffusers_output=lambda out: _to_uint8(out.images[0]), diffc_output=lambda out: np.asarray(out.images[0]),
    diffusers_forward=_zimage_diffusers_forward,
    note="Z-Image-Turbo: 8 steps without guidance; the DiT-forward row uses a 128-token caption.",
)


# ------------------------------------------------------------------------------------ Qwen-Image


def _qwen_grid(spec: BenchSpec, wl: Workload) -> tuple[int, int]:
    """Packed latent rows and columns of a wl.height x wl.width image (8x VAE, 2x2 patches)."""
    f = 2 * spec.vae.scale_factor_spatial
    return wl.height // f, wl.width // f


def _qwen_latent_shape(spec: BenchSpec, wl: Workload) -> tuple[int, ...]:
    h, w = _qwen_grid(spec, wl)
    return 1, spec.vae.z_dim, 1, 2 * h, 2 * w


def _qwen_images(edit: bool) -> int:
    return 2 if edit else 1  # the generated image, then (editing) one input image of the same size


def _qwen_inputs(edit: bool):
    def inputs(spec: BenchSpec, wl: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        cfg, gen = spec.transformer, torch.Generator("cpu").manual_seed(INPUT_SEED)
        h, w = _qwen_grid(spec, wl)
        n = _qwen_images(edit)
        return {
            "hidden_states": _randn((1, n * h * w, cfg.in_channels), gen, device, dtype),
            "encoder_hidden_states": _randn((1, wl.max_sequence_length, cfg.joint_attention_dim), gen, device, dtype),
            "encoder_hidden_states_mask": None,  # batch 1, every token real: no mask (diffusers drops an all-ones one)
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "img_shapes": [[(1, h, w)] * n],  # diffusers' form: one list of (frames, rows, columns) per sample
        }

    return inputs


def _qwen_flops(edit: bool):
    def flops(spec: BenchSpec, wl: Workload) -> Flops:
        h, w = _qwen_grid(spec, wl)
        return qwen_image_dit_flops(spec.transformer, 1, _qwen_images(edit) * h * w, wl.max_sequence_length)

    return flops


def _qwen_cfg(wl: Workload) -> bool:
    return wl.guidance_scale > 1.0 and wl.negative_prompt is not None


def _qwen_kwargs(wl: Workload) -> dict[str, Any]:
    kwargs = dict(height=wl.height, width=wl.width, num_inference_steps=wl.steps, true_cfg_scale=wl.guidance_scale,
                  negative_prompt=wl.negative_prompt, max_sequence_length=wl.max_sequence_length)
    return {k: v for k, v in kwargs.items() if v is not None}


def _qwen_encode(pipe, wl: Workload):
    device = pipe._execution_device
    pipe.encode_prompt(prompt=wl.prompt, device=device, max_sequence_length=wl.max_sequence_length)
    if _qwen_cfg(wl):
        pipe.encode_prompt(prompt=wl.negative_prompt, device=device, max_sequence_length=wl.max_sequence_length)


QWEN_IMAGE = Family(
    name="qwen_image", diffusers_pipeline="QwenImagePipeline", diffusers_transformer="QwenImageTransformer2DModel",
    diffusers_vae="AutoencoderKLQwenImage", native_transformer="QwenImageTransformer2DModel",
    native_vae="AutoencoderKLQwenImage", latent_shape=_qwen_latent_shape, dit_inputs=_qwen_inputs(False),
    dit_flops=_qwen_flops(False), forwards_per_step=lambda wl: 2 if _qwen_cfg(wl) else 1,  # true CFG: two calls
    call_kwargs=_qwen_kwargs, diffusers_encode=_qwen_encode, warmup_steps=2,
    diffusers_output=lambda out: _to_uint8(out.images[0]), diffc_output=lambda out: np.asarray(out.images[0]),
    note="True CFG runs the conditional and unconditional DiT calls as two batch-1 forwards per step in both "
         "engines. diffc pads the prompt states to a 128-token bucket with a mask (so one compiled graph serves "
         "both calls and any prompt of the bucket); diffusers passes them unpadded without a mask. The DiT forward "
         "row uses the same unmasked 128-token text for both.",
)
QWEN_IMAGE_EDIT = dataclasses.replace(
    QWEN_IMAGE, name="qwen_image_edit", diffusers_pipeline="QwenImageEditPipeline", dit_inputs=_qwen_inputs(True),
    dit_flops=_qwen_flops(True), e2e=False,
    note="Editing one image of the output's size: its latent tokens follow the generated image's (twice the image "
         "tokens of text-to-image). Only the DiT forward and the VAE are compared: the end-to-end edit run needs "
         "diffusers' Qwen2VLProcessor, which transformers builds only with torchvision.")

FAMILIES: dict[str, Family] = {"flux": FLUX, "wan": WAN, "wan-i2v": WAN_I2V, "wan-ti2v": WAN_TI2V, "sd3": SD3, "hunyuanvideo": HUNYUAN_VIDEO,
                               "flux-kontext": FLUX_KONTEXT, "zimage": ZIMAGE, "qwen_image": QWEN_IMAGE,
                               "qwen_image_edit": QWEN_IMAGE_EDIT}
