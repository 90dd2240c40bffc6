"""Read safetensors weights (single file or sharded with an index) straight to a device and dtype."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import CheckpointError

# File names diffusers writes, in the order it prefers them.
_SINGLE = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_INDEX = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a component's weights, checking that every shard is on disk."""
    for name in _INDEX:
        index_path = folder / name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path} names shard(s) that are not on disk: {', '.join(missing)}"
                )
            return [folder / s for s in shards]
    for name in _SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    raise CheckpointError(
        f"{folder}: no safetensors weights found (expected one of {', '.join(_SINGLE + _INDEX)}"
        + (f"; found several unindexed files: {', '.join(found)}" if found else "")
        + ")"
    )


def tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def iter_tensors(
    files: list[Path], device: torch.device, dtype_for: "callable[[str], torch.dtype | None]"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, read directly onto ``device``.

    ``dtype_for(name)`` gives the target dtype for a floating-point tensor (``None`` keeps the
    stored dtype). Only one tensor at a time is ever held in its stored dtype.
    """
    load_device = "cpu" if device.type == "meta" else str(device)
    for path in files:
        with safe_open(str(path), framework="pt", device=load_device) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                target = dtype_for(name)
                if target is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                yield name, tensor
