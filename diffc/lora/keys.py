"""Splitting a LoRA file's tensor names into source modules and the role of each tensor.

Every format names a tensor ``<module stem><suffix>``; the suffix says what it is:

    .lora_A.weight / .lora_down.weight / .down.weight    down projection A (rank, in)
    .lora_B.weight / .lora_up.weight   / .up.weight      up projection B (out, rank)
    .lora_A.bias   / .lora_B.bias                         LoRA biases (PEFT ``lora_bias``)
    .alpha                                                alpha: the module's scale is alpha / rank
    .diff / .diff_b                                       full weight / bias deltas (ComfyUI, Wan distill LoRAs)
    .scale / .weight (on a norm)                          a norm weight replacing the model's (BFL control LoRAs)

PEFT names saved with an adapter name (``.lora_A.default.weight``) are read as plain ``lora_A``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A.bias", "down_bias"), (".lora_B.bias", "up_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_down.bias", "down_bias"),
    (".lora_up.bias", "up_bias"), (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
    (".dora_scale", "dora"), (".lora_magnitude_vector", "dora"),
    (".scale", "value"), (".weight", "value"),
)
ADAPTER_NAMED = re.compile(r"\.(lora_[AB])\.[A-Za-z0-9_]+\.(weight|bias)$")
# Text-encoder LoRA keys of every format (diffusers, kohya, ComfyUI).
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoders.", "lora_te_",
                         "lora_te1_", "lora_te2_", "lora_te3_", "te.", "te1.", "te2.", "te_", "lora_te.")
ROLES = ("down", "up", "down_bias", "up_bias", "alpha", "diff", "diff_b", "value")


@dataclasses.dataclass
class SourceModule:
    """The tensors a LoRA file holds for one module of the model it was trained on."""

    stem: str
    keys: list[str] = dataclasses.field(default_factory=list)
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    value: torch.Tensor | None = None

    @property
    def has_lora(self) -> bool:
        return self.down is not None or self.up is not None


@dataclasses.dataclass
class ParsedKeys:
    modules: dict[str, SourceModule]
    text_encoder: list[str]
    dora: list[str]


def split_key(key: str) -> tuple[str, str] | None:
    """``(stem, role)`` of a tensor name, or None when it has no LoRA suffix."""
    key = ADAPTER_NAMED.sub(r".\1.\2", key)
    for suffix, role in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def parse_keys(tensors: dict[str, torch.Tensor]) -> tuple[ParsedKeys, list[str]]:
    """Group ``tensors`` by source module; also returns the keys that name nothing a LoRA holds."""
    modules: dict[str, SourceModule] = {}
    text_encoder, dora, unknown = [], [], []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            text_encoder.append(key)
            continue
        parsed = split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        stem, role = parsed
        if role == "dora":
            dora.append(key)
            continue
        module = modules.setdefault(stem, SourceModule(stem))
        if getattr(module, role) is not None:  # e.g. both lora_A and lora_down for one module
            unknown.append(key)
            continue
        setattr(module, role, tensor)
        module.keys.append(key)
    return ParsedKeys(modules, text_encoder, dora), unknown
