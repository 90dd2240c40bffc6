"""Write native modules and configs in diffusers' on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WRITER_VERSION = "diffc-demo"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_native(folder: Path, class_name: str, module: torch.nn.Module) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` for a native model."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"_class_name": class_name, "_diffusers_version": WRITER_VERSION,
                                        **module.config.to_dict()})
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def write_model_index(root: Path, class_name: str, components: dict[str, tuple[str, str]]) -> None:
    write_json(root / "model_index.json", {"_class_name": class_name, "_diffusers_version": WRITER_VERSION,
                                           **{k: list(v) for k, v in components.items()}})
