"""Multi-GPU inference of one request: CFG-parallel and unified sequence parallelism (Ulysses + ring).

:mod:`.config` the layout and its checks, :mod:`.mesh` the process groups, :mod:`.attention` the
Ulysses / ring attention and its graph op, :mod:`.layer` the DiT stack's parallelism layer.
Launching the workers is the CLI's (``diffc/cli/parallel.py``).
"""

import importlib

from .config import ParallelConfig, resolve, valid_layouts

_MESH = ("Mesh", "ParallelError", "init_mesh")  # imported on first use: the CLI's parser must not wait for torch


def __getattr__(name: str):
    if name in _MESH:
        return getattr(importlib.import_module(f"{__name__}.mesh"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Mesh", "ParallelConfig", "ParallelError", "init_mesh", "resolve", "valid_layouts"]
