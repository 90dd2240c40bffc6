"""LoRA files on the generic backend: converted by the diffusers pipeline class's own ``lora_state_dict``.

diffc reads the file (safetensors only, :func:`diffc.lora.files.read_lora_file`) and hands diffusers
the tensors as a dict, so diffusers opens no file and unpickles nothing. Whatever format the class
accepts (original HunyuanVideo names, kohya, LTX's ComfyUI names, ...) comes back in diffusers/PEFT
names, which diffc's own converter maps onto the transformer and merges in place. A class without
``lora_state_dict``, or one that raises on the file, leaves the file as read: diffc's converter then
says what does not match.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ...lora.files import LoraFile

log = logging.getLogger(__name__)


def diffusers_lora_converter(pipeline_cls: type) -> Callable[[LoraFile], LoraFile] | None:
    """A ``LoraFile -> LoraFile`` converter through ``pipeline_cls.lora_state_dict``, or None without one."""
    load = getattr(pipeline_cls, "lora_state_dict", None)
    if not callable(load):
        return None
    label = f"diffusers:{pipeline_cls.__name__}"

    def convert(file: LoraFile) -> LoraFile:
        try:
            # a copy: some converters pop the dict they are given; return_alphas: the classes that
            # take alphas apart from the state dict (FLUX's) return them instead of dropping them
            result = load(dict(file.tensors), return_lora_metadata=True, return_alphas=True)
            tensors, alphas, metadata = _unpack(result)
        except Exception as exc:  # noqa: BLE001 - any refusal of the format means: use the file as read
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            log.info("%s.lora_state_dict did not convert %s (%s); using the file as read",
                     pipeline_cls.__name__, file.path, message)
            return dataclasses.replace(file, converter_error=f"{label}: {message}")
        for key, value in (alphas or {}).items():
            name = key if key.endswith(".alpha") else f"{key}.alpha"
            tensors[name] = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        config = file.config or (metadata if isinstance(metadata, dict) else {})
        if tensors.keys() == file.tensors.keys() and all(tensors[k] is file.tensors[k] for k in tensors):
            return dataclasses.replace(file, config=config)
        return dataclasses.replace(file, tensors=tensors, config=config, converted_by=label)

    return convert


def _unpack(result: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Any]:
    """``(state_dict, network_alphas, metadata)`` of what ``lora_state_dict(..., return_lora_metadata=True)``
    returns: ``state_dict``, ``(state_dict, metadata)`` or ``(state_dict, network_alphas, metadata)``."""
    if isinstance(result, dict):
        return dict(result), None, None
    if not isinstance(result, tuple) or not result or not isinstance(result[0], dict):
        raise TypeError(f"lora_state_dict returned {type(result).__name__}, not a state dict")
    if len(result) == 2:
        return dict(result[0]), None, result[1]
    if len(result) == 3:
        return dict(result[0]), result[1], result[2]
    raise TypeError(f"lora_state_dict returned a tuple of {len(result)} items")
