"""Qwen2.5-VL as Qwen-Image's text encoder: prompt templates, the vision processor, and the drop-index logic.

The prompt is wrapped in Qwen-Image's chat template; the encoder's last hidden states of the real
(non-padding) tokens are kept, minus the template's fixed prefix (``drop_idx`` tokens), and the prompts of
a batch are zero-padded to the longest with a mask (None when nothing is padded), as diffusers'
``QwenImagePipeline._get_qwen_prompt_embeds`` does. Editing puts the input image(s) in the template as
``<|vision_start|><|image_pad|><|vision_end|>``; each ``<|image_pad|>`` becomes one token per merged
vision patch, as transformers' ``Qwen2VLProcessor`` expands it, without torchvision (the PIL image
processor and the tokenizer are loaded separately).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from ..errors import CheckpointError
from .stages import RunContext

log = logging.getLogger("diffc")

T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
T2I_DROP = 34
EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
               "objects, background), then explain how the user's text instruction should alter or modify the image. "
               "Generate a new image that meets the user's requirements while maintaining consistency with the "
               "original input where appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_IMAGE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_DROP = 64
TOKENIZER_MAX_LENGTH = 1024
# Prompt states are zero-padded (and masked) to a multiple of this many tokens, the prompt and the negative prompt
# to the same length: the DiT then sees a few text lengths instead of one per prompt, so a compiled graph serves
# any prompt of its bucket and both true-CFG calls. The mask keeps the result diffusers' (padding never attended).
TEXT_BUCKET = 128
IMAGE_PAD = "<|image_pad|>"
IMAGE_PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")


@dataclasses.dataclass
class VLProcessor:
    """The ``processor`` component: Qwen2-VL's image processor (PIL backend) and the tokenizer."""

    image_processor: object
    tokenizer: object

    def __call__(self, texts: list[str], images: list | None) -> dict[str, torch.Tensor]:
        """Token ids and mask of ``texts`` (padded to the longest) with each ``<|image_pad|>`` expanded, and the
        vision inputs of ``images`` (used by the image tokens in order, over all texts)."""
        out: dict[str, torch.Tensor] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            counts = iter([int(thw.prod()) // merge for thw in vision["image_grid_thw"]])
            expanded = []
            for text in texts:
                parts = text.split(IMAGE_PAD)
                expanded.append(parts[0] + "".join("\0" * next(counts) + p for p in parts[1:]))
            texts = [t.replace("\0", IMAGE_PAD) for t in expanded]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        out["input_ids"], out["attention_mask"] = tokens.input_ids, tokens.attention_mask
        return out


def load_vl_processor(folder: Path) -> VLProcessor:
    """``processor/``: the PIL Qwen2-VL image processor from preprocessor_config.json and the tokenizer beside it."""
    import json

    import transformers

    from ..checkpoints import first_line as _first_line, refuse_folder_code

    config_path = folder / "preprocessor_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"missing file: {config_path}")
    try:
        kind = json.loads(config_path.read_bytes()).get("image_processor_type")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    if kind not in IMAGE_PROCESSOR_TYPES:
        raise CheckpointError(f"{config_path}: image_processor_type {kind!r} is not supported; "
                              f"accepted: {', '.join(IMAGE_PROCESSOR_TYPES)}")
    refuse_folder_code(folder)  # never code from the folder (auto_map in tokenizer_config.json and the like)
    try:
        image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: cannot load the Qwen2-VL processor ({_first_line(exc)})") from None
    return VLProcessor(image_processor, tokenizer)


def condition_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) with the aspect ratio of ``width x height`` and about ``area`` pixels, multiples of 32
    (diffusers' ``calculate_dimensions`` for Qwen-Image-Edit)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


def encode_texts(ctx: RunContext, texts: list[str], images: list | None, drop_idx: int,
                 max_length: int | None, label: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qwen2.5-VL states of ``texts`` after the template prefix: (B, L, hidden) zero-padded, and the (B, L) mask
    (None when no prompt is padded). ``max_length`` cuts the states (text-to-image), with a warning."""
    c = ctx.components
    encoder = c["text_encoder"]
    if images is None:
        tok = c["tokenizer"]
        tokens = tok(texts, max_length=TOKENIZER_MAX_LENGTH + drop_idx, padding=True, truncation=True,
                     return_tensors="pt")
        inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        full = tok(texts, padding=True, return_tensors="pt").input_ids.shape[1]
        if full > inputs["input_ids"].shape[1]:
            _warn(ctx, f"a {label} was truncated to {TOKENIZER_MAX_LENGTH} tokens")
    else:
        inputs = c["processor"](texts, images)
    device = ctx.device
    mask = inputs["attention_mask"].to(device)
    kwargs = {"input_ids": inputs["input_ids"].to(device), "attention_mask": mask, "output_hidden_states": True,
              "use_cache": False}  # an encoder pass: no K/V kept for later tokens
    if "pixel_values" in inputs:
        kwargs["pixel_values"] = inputs["pixel_values"].to(device=device, dtype=encoder.dtype)
        kwargs["image_grid_thw"] = inputs["image_grid_thw"].to(device)
    states = encoder.model(**kwargs).hidden_states[-1]  # (B, T, hidden); the LM head is not needed
    keep = mask.bool()
    per_prompt = [s[k][drop_idx:] for s, k in zip(states, keep)]  # real tokens minus the template prefix
    longest = max(p.shape[0] for p in per_prompt)
    embeds = torch.stack([torch.cat([p, p.new_zeros(longest - p.shape[0], p.shape[1])]) for p in per_prompt])
    lengths = torch.tensor([p.shape[0] for p in per_prompt], device=device)
    prompt_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None]).long()
    if max_length is not None and longest > max_length:
        _warn(ctx, f"a {label} has {longest} tokens; kept the first {max_length} (max_sequence_length)")
        embeds, prompt_mask = embeds[:, :max_length], prompt_mask[:, :max_length]
    return embeds.to(ctx.dtype), (None if bool(prompt_mask.all()) else prompt_mask)


def pad_to_bucket(*encoded: tuple[torch.Tensor, torch.Tensor | None] | None, bucket: int = TEXT_BUCKET):
    """Each ``(embeds, mask)`` zero-padded to one common length, the longest rounded up to ``bucket``, with its
    (B, L) mask made explicit (None stays None: a prompt not encoded)."""
    present = [e for e in encoded if e is not None]
    length = -(-max(e[0].shape[1] for e in present) // bucket) * bucket
    out = []
    for item in encoded:
        if item is None:
            out.append((None, None))
            continue
        embeds, mask = item
        b, n, d = embeds.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        out.append((torch.cat([embeds, embeds.new_zeros(b, length - n, d)], dim=1),
                    torch.cat([mask, mask.new_zeros(b, length - n)], dim=1)))
    return out


def _warn(ctx: RunContext, message: str) -> None:
    ctx.warnings.append(message)
    log.warning(message)
