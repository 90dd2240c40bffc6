"""Where a loaded model's weights are stored on disk: a view of the checkpoint instead of a copy in host memory.

The loader (:func:`diffc.loader.components.load_native_model`) remembers, for every tensor it assigned as
stored (no dtype conversion), the safetensors file and key it came from and a mark of the parameter as loaded
(its address and version counter). While a parameter still carries that mark, its value is the file's, bit
for bit, so a weight that must leave the device (the fp8 tier's bf16 originals no compiled graph reads,
:mod:`diffc.runtime.fp8`) can become a memory-mapped view of the file: nothing is copied, and no host
memory is used beyond the operating system's page cache, which it can reclaim. A write through the parameter
(a LoRA merge) bumps its version and a swapped tensor has another address: either way the mark no longer
matches and the caller copies instead. The file's identity (device, inode, size, modification time) is
checked before a view is made and before one is read back, so a checkpoint rewritten on disk is a clear
error, never silently different weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

ATTR = "_diffc_stored_weights"


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of ``path``, None when it cannot be read: a file written again is another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _mark(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor._version


@dataclass(frozen=True)
class _Entry:
    path: Path
    key: str
    identity: tuple[int, int, int, int] | None
    mark: tuple[int, int]  # the parameter's (address, version) while it holds the file's values


class StoredWeights:
    """The checkpoint tensors a model's parameters (by state-dict name) still equal, bit for bit."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def add(self, name: str, path: Path, key: str, param: torch.Tensor) -> None:
        self.entries[name] = _Entry(Path(path), key, file_identity(Path(path)), _mark(param))

    def views(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Memory-mapped CPU views of the file tensors that ``params`` (by name) still equal; a parameter that
        may not (written or swapped since, its file changed on disk, another shape or dtype) has none. Each
        file is opened once."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name, param in params.items():
            entry = self.entries.get(name)
            if entry is not None and entry.mark == _mark(param):
                by_file.setdefault(entry.path, []).append(name)
        found = {}
        for path, names in by_file.items():
            identity = file_identity(path)
            names = [n for n in names if self.entries[n].identity == identity]
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in names:
                        tensor = f.get_tensor(self.entries[name].key)
                        if tensor.shape == params[name].shape and tensor.dtype == params[name].dtype:
                            found[name] = tensor
            except (SafetensorError, OSError, RuntimeError, ValueError):
                continue
        return found

    def check_unchanged(self, name: str) -> None:
        """Before a view of ``name``'s file is read back: the file must be the one the view was made of."""
        entry = self.entries[name]
        if entry.identity != file_identity(entry.path):
            raise CheckpointError(f"{entry.path}: the checkpoint file changed on disk after it was loaded; "
                                  f"{name} was mapped from it and cannot be read back. Load the model again")

    def renew(self, name: str, param: torch.Tensor) -> None:
        """``param`` holds the file's values again (read back from a view): remember its new mark."""
        entry = self.entries.get(name)
        if entry is not None:
            self.entries[name] = replace(entry, mark=_mark(param))


def stored_weights(module: nn.Module) -> StoredWeights | None:
    """The :class:`StoredWeights` the loader attached to ``module``, if it loaded it from a checkpoint."""
    found = module.__dict__.get(ATTR)
    return found if isinstance(found, StoredWeights) else None


def attach(module: nn.Module, stored: StoredWeights) -> None:
    module.__dict__[ATTR] = stored


__all__ = ["StoredWeights", "attach", "stored_weights"]
