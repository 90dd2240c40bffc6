"""Which diffusers class name is served by which native diffc module.

A native model is a plain ``torch.nn.Module`` whose ``state_dict`` names match the diffusers
checkpoint exactly. It declares, as class attributes:

- ``config_class``: a frozen ``ModelConfig`` dataclass; the model is built as ``cls(config)``;
- ``_repeated_blocks``: names of the ``nn.ModuleList`` attributes holding the repeated blocks
  (offload, CUDA graphs and compile read this instead of special-casing a model);
- ``_keep_in_fp32_modules``: module-name fragments whose weights load in float32 whatever the
  pipeline dtype (as diffusers does);
- optionally ``init_non_persistent_buffers(device)``: recomputes buffers that are not in the
  checkpoint after the model was built on the meta device.
"""

from __future__ import annotations

import importlib

# diffusers class name -> "module:attribute" of the native implementation. Imported lazily so that
# `diffc --help` does not import every model family.
_NATIVE_MODELS: dict[str, str] = {
    "FluxTransformer2DModel": "diffc.models.flux.transformer:FluxTransformer2DModel",
    "AutoencoderKL": "diffc.models.autoencoder_kl:AutoencoderKL",
    "WanTransformer3DModel": "diffc.models.wan.transformer:WanTransformer3DModel",
    "AutoencoderKLWan": "diffc.models.wan.vae:AutoencoderKLWan",
    "ZImageTransformer2DModel": "diffc.models.zimage.transformer:ZImageTransformer2DModel",
    "QwenImageTransformer2DModel": "diffc.models.qwen_image.transformer:QwenImageTransformer2DModel",
    "AutoencoderKLQwenImage": "diffc.models.qwen_image.vae:AutoencoderKLQwenImage",
}

# transformers classes used as text encoders, loaded through transformers itself.
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel",
                 "Qwen3Model",  # Z-Image
                 "Qwen2_5_VLForConditionalGeneration")  # Qwen-Image
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "AutoTokenizer",
              "Qwen2Tokenizer", "Qwen2TokenizerFast")  # Z-Image (Qwen3's tokenizer class), Qwen-Image
# vision-language processors, loaded as their image processor (PIL backend: no torchvision) and tokenizer
PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
# transformers vision towers used as image encoders (Wan2.1 I2V), loaded like the text encoders.
IMAGE_ENCODERS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
# Image processors: read from their JSON config with transformers' PIL backend (no torchvision needed).
IMAGE_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorPil")

_SCHEDULERS: dict[str, str] = {
    "FlowMatchEulerDiscreteScheduler": "diffc.pipelines.schedulers.flow_match_euler:FlowMatchEulerDiscreteScheduler",
    "UniPCMultistepScheduler": "diffc.pipelines.schedulers.unipc:UniPCMultistepScheduler",
}


def _resolve(path: str):
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def native_model_class(class_name: str):
    return _resolve(_NATIVE_MODELS[class_name])


def scheduler_class(class_name: str):
    return _resolve(_SCHEDULERS[class_name])


def supported_classes() -> dict[str, tuple[str, ...]]:
    return {
        "models": tuple(sorted(_NATIVE_MODELS)),
        "text_encoders": TEXT_ENCODERS,
        "tokenizers": TOKENIZERS,
        "processors": PROCESSORS,
        "image_encoders": IMAGE_ENCODERS,
        "image_processors": IMAGE_PROCESSORS,
        "schedulers": tuple(sorted(_SCHEDULERS)),
    }


def is_native_model(name: str) -> bool:
    return name in _NATIVE_MODELS


def is_scheduler(name: str) -> bool:
    return name in _SCHEDULERS
