"""Reading a LoRA file: one ``.safetensors`` file, or a folder holding one, with safetensors only.

Nothing is unpickled: ``.bin``/``.pt``/``.ckpt`` files are refused by name. The file's
``__metadata__`` is read as text; diffusers stores its LoRA config there as JSON under
``lora_adapter_metadata`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
keys prefixed with the component, e.g. ``transformer.lora_alpha``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import open_safetensors, stored_tensors
from ..errors import CheckpointError, InvalidArgumentError
from ..stored import file_identity

PREFERRED = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass
class LoraFile:
    """A LoRA file's tensors (on the CPU, in their stored dtype) and its diffusers LoRA config, if any.

    ``converted_by`` names what renamed the tensors after reading (the generic backend's diffusers
    pipeline class, e.g. ``diffusers:HunyuanVideoPipeline``); ``converter_error`` says why it did not."""

    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    nbytes: int
    converted_by: str | None = None
    converter_error: str | None = None
    identity: tuple[int, int, int, int] | None = None  # (device, inode, size, mtime) when read: a rewrite is new


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file ``path`` names: itself, or the one LoRA file in a folder."""
    try:
        return _resolve_lora_file(Path(path).expanduser())
    except OSError as exc:  # a name too long, a folder that cannot be listed, ...
        raise InvalidArgumentError("lora_path", f"{str(path)[:200]}: cannot be read "
                                   f"({exc.strerror or type(exc).__name__})") from None


def _resolve_lora_file(p: Path) -> Path:
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".safetensors"
                       and not any(s in f.name for s in ("optimizer", "scheduler")))
        if any(f.name == PREFERRED for f in found):
            return p / PREFERRED
        if len(found) == 1:
            return found[0]
        if not found:
            pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLED)
            hint = (f" (found {', '.join(pickled[:5])}: pickled files are not loaded, convert them to "
                    "safetensors)") if pickled else ""
            raise InvalidArgumentError("lora_path", f"{p}: the folder holds no .safetensors file{hint}")
        raise InvalidArgumentError("lora_path", f"{p}: the folder holds several .safetensors files "
                                   f"({', '.join(f.name for f in found[:8])}); give the file itself")
    if not p.exists():
        raise InvalidArgumentError("lora_path", f"file not found: {p}")
    if p.suffix in PICKLED:
        raise InvalidArgumentError("lora_path", f"{p}: pickled checkpoints ({p.suffix}) are never loaded; "
                                   "use a .safetensors file")
    if not p.is_file():
        raise InvalidArgumentError("lora_path", f"{p}: not a regular file")
    return p


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read every tensor of the LoRA file at ``path`` (a file or a folder) onto the CPU, once its header is checked
    (a malformed one, a tensor of a kind or shape no LoRA has: one line naming the file, before any tensor is read)."""
    from safetensors import SafetensorError

    file = resolve_lora_file(path)
    identity = file_identity(file)
    with open_safetensors(file) as f:  # safetensors checks the header (one line naming the file)
        stored = stored_tensors(f)
        if not stored:
            raise CheckpointError(f"{file}: the file holds no tensors")
        _check_kinds(file, stored)
        metadata = f.metadata() or {}
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    broken = [n for n, t in tensors.items() if t.is_floating_point() and not n.endswith(".alpha")  # (convert's)
              and not bool(torch.isfinite(t).all())]
    if broken:  # merged, they would make the DiT's weights NaN (a black image, no error)
        raise CheckpointError(f"{file}: {len(broken)} tensor(s) hold NaN or infinite values: "
                              + ", ".join(broken[:5]) + (", ..." if len(broken) > 5 else ""))
    config: dict[str, Any] = {}
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            config = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; a number of 4300+ digits; absurd nesting
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{file}: its '{METADATA_KEY}' metadata is not valid JSON ({reason})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file}: its '{METADATA_KEY}' metadata is not a JSON object")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return LoraFile(file, tensors, config, nbytes, identity=identity)


# What a LoRA tensor may be stored as (safetensors' names): floats that convert exactly (integers are refused by name
# as matrices, and kept as an alpha); not fp8/fp4 or complex, which no LoRA trainer writes and torch cannot check or
# merge as floats.
FLOATS = ("F16", "BF16", "F32", "F64")
MAX_DIMS = 5  # a Conv3d weight's (Wan's patch embedding), the most any supported model's weight has


def _check_kinds(file: Path, stored: dict[str, tuple[str, list[int]]]) -> None:
    """The stored kinds and shapes (``stored_tensors``) are a LoRA's, from the header."""
    odd = [f"{n} ({dtype})" for n, (dtype, _) in stored.items() if dtype not in FLOATS and dtype[0] in "FC"]
    if odd:
        raise CheckpointError(f"{file}: {len(odd)} tensor(s) stored as a kind no LoRA holds: " + ", ".join(odd[:5])
                              + (", ..." if len(odd) > 5 else "") + "; LoRA tensors are float32, bfloat16, float16 "
                              "or float64 (F32, BF16, F16, F64; an alpha may be an integer)")
    deep = [f"{n} ({len(shape)})" for n, (_, shape) in stored.items() if len(shape) > MAX_DIMS]
    if deep:
        raise CheckpointError(f"{file}: {len(deep)} tensor(s) with more than {MAX_DIMS} dimensions: "
                              + ", ".join(deep[:5]) + (", ..." if len(deep) > 5 else "") + "; no model weight has them")


def component_prefix(config: dict[str, Any], prefixes: tuple[str, ...] = ("transformer",)) -> str:
    """How the DiT's keys in ``config`` begin: ``"transformer."`` (pipeline files) or ``""`` (model files)."""
    return next((p + "." for p in prefixes if any(k.startswith(p + ".") for k in config)), "")


def component_config(config: dict[str, Any], prefixes: tuple[str, ...] = ("transformer",)) -> dict[str, Any]:
    """The LoRA config of the DiT: keys under ``transformer.`` (pipeline files) or unprefixed (model files)."""
    prefix = component_prefix(config, prefixes)
    if prefix:
        return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    return {k: v for k, v in config.items() if "." not in k}
