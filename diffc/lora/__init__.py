"""LoRA adapters: read any format diffusers accepts for a model, convert to diffc's parameter names,
merge into the DiT in place and unmerge bit-exactly. See ``LoraManager`` and README.md ("LoRA")."""

import importlib
from typing import TYPE_CHECKING

from .spec import TARGETS, Active

if TYPE_CHECKING:
    from .manager import LoraManager

# imported on first use (PEP 562): the CLI's parser reads ``spec`` only, and must not wait for torch
_LAZY = {"Adapter": "manager", "LoraCounters": "manager", "LoraManager": "manager", "ModuleWeights": "weights"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Active", "Adapter", "LoraCounters", "LoraManager", "ModuleWeights", "TARGETS", "apply_snapshot", "manager_for",
           "snapshot_of"]


def manager_for(pipe) -> "LoraManager":
    """The pipeline's LoRA manager, made on first use. Offloaded weights are refused until the runtime
    hosts LoRA on its host copies (the merge would write GPU copies that offload discards)."""
    manager = getattr(pipe, "_lora", None)
    if manager is None:
        from ..errors import InvalidArgumentError

        offload = getattr(pipe.runtime_options, "offload", "none")
        if offload != "none":
            raise InvalidArgumentError("lora", f"LoRA adapters cannot be merged with --offload {offload} yet; "
                                       "load the pipeline without offload to use them")
        from .manager import LoraManager

        manager = pipe._lora = LoraManager(pipe.components, convert_file=pipe.lora_file_converter())
    return manager


def apply_snapshot(pipe, snapshot) -> None:
    """Bring ``pipe``'s DiT to a :meth:`LoraManager.snapshot` (an empty one: the original weights),
    without making a manager for a pipeline that never used LoRA."""
    manager = getattr(pipe, "_lora", None)
    if manager is None and not any(state for _, state in snapshot or ()):
        return
    pipe.lora.restore(snapshot or ())


def snapshot_of(pipe) -> tuple:
    manager = getattr(pipe, "_lora", None)
    return () if manager is None else manager.snapshot()
