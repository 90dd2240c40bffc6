"""Load a diffusers-format folder whose pipeline class diffc has no native spec for, with diffusers itself.

diffusers is an optional dependency (``pip install 'diffc[diffusers]'``). Before diffusers sees the
folder, ``model_index.json`` is checked so that loading runs no code from it: the pipeline class must
be one diffusers ships, every component must come from diffusers or transformers (never a module in
the folder), and weights load with ``use_safetensors=True`` and ``trust_remote_code=False``. Component configs
and tokenizer folders are checked first (``checks``); whatever diffusers, transformers, safetensors or torch
still raise on the folder's files is one ``CheckpointError`` line naming the component's folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...checkpoints import check_floating_stored, component_entry, first_line
from ...errors import CheckpointError, DiffcError
from ...progress import library_bars_off
from .checks import check_component_files

log = logging.getLogger(__name__)

DIFFUSERS_EXTRA = "pip install 'diffc[diffusers]'"
LIBRARIES = ("diffusers", "transformers")


def import_diffusers():
    """``diffusers``, or a :class:`DiffcError` that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise DiffcError(f"this checkpoint's pipeline has no native diffc implementation and runs through "
                         f"diffusers, which is not installed ({exc}); install it with: {DIFFUSERS_EXTRA}") from None
    return diffusers


def pipeline_class(diffusers, index: dict[str, Any], where: Path):
    """The diffusers pipeline class ``model_index.json`` names, checked to be one diffusers ships."""
    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise CheckpointError(f"{where}: pipeline class {name!r} is neither native to diffc nor a pipeline of the "
                              f"installed diffusers {diffusers.__version__}; custom pipelines (code in the "
                              "checkpoint) are not loaded")
    return cls


def check_components(diffusers, index: dict[str, Any], where: Path) -> None:
    """Every component must be a class of diffusers (or one of its pipeline modules) or transformers."""
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        parsed = component_entry(where, name, entry)
        if parsed is None:
            continue  # an optional component left out
        library = parsed[0]
        known = library in LIBRARIES or (library.isidentifier() and hasattr(diffusers.pipelines, library))
        if not known:
            raise CheckpointError(f"{where}: component {name!r} comes from {library!r}; diffc loads components of "
                                  f"{', '.join(LIBRARIES)} only (never code from the checkpoint)")


def text_encoder_names(pipe) -> tuple[str, ...]:
    """The components layerwise offload keeps in host memory between uses: the pipeline's transformers
    models (text and image encoders), whatever the pipeline calls them (also while they replay CUDA graphs)."""
    import transformers

    from ...runtime.dit_stack import unwrap

    return tuple(name for name, module in pipe.components.items()
                 if isinstance(unwrap(module), transformers.PreTrainedModel))


def load_diffusers_pipeline(root: Path, index: dict[str, Any], device: torch.device, dtype: torch.dtype,
                            offload: str = "none"):
    """``DiffusionPipeline.from_pretrained`` on ``root``, safetensors only, in ``dtype`` (diffusers keeps
    each model's ``_keep_in_fp32_modules`` in float32), moved to ``device``; with ``offload`` the weights
    stay in host memory, where diffc's offload places them (the GPU never holds the whole pipeline)."""
    diffusers = import_diffusers()
    where = root / "model_index.json"
    cls = pipeline_class(diffusers, index, where)
    check_components(diffusers, index, where)
    log.info("loading %s through diffusers %s", cls.__name__, diffusers.__version__)
    from diffusers.pipelines import pipeline_utils

    check_component_files(root, index)
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"  # renamed in diffusers 0.42
    try:
        with library_bars_off():  # diffusers' and transformers' loading bars
            pipe = cls.from_pretrained(str(root), use_safetensors=True, trust_remote_code=False,
                                       local_files_only=True, **{dtype_key: dtype})
    except (DiffcError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside diffusers/transformers/torch on these files
        raise CheckpointError(load_failure(exc, root, index, cls.__name__)) from None
    check_loaded(pipe, root, index)  # before .to(), which cannot copy a tensor the files did not hold
    if offload == "none":
        try:
            pipe.to(device)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a device failure, not the checkpoint's: still one line
            raise DiffcError(f"{root}: cannot move {cls.__name__} to {device} ({first_line(exc, typed=True)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def failing_component(exc: BaseException) -> str | None:
    """The component diffusers was loading when ``exc`` was raised: the ``name`` of its ``load_sub_model`` frame."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load_sub_model" and isinstance(frame.f_locals.get("name"), str):
            return frame.f_locals["name"]
        tb = tb.tb_next
    return None


def load_failure(exc: Exception, root: Path, index: dict[str, Any], pipeline: str) -> str:
    """One line for a load that failed inside diffusers: the component's folder and class, and the first line
    of the library's reason."""
    reason = first_line(exc, typed=True)
    name = failing_component(exc)
    if name is not None and isinstance(index.get(name), list):
        where, what = root / name, f"{name} ({index[name][1]})"
    else:
        where, what = root, pipeline
    hint = "; weights must be safetensors" if isinstance(exc, OSError) else ""
    return f"{where}: diffusers could not load {what} ({reason}){hint}"


def check_loaded(pipe, root: Path, index: dict[str, Any]) -> None:
    """Refuse a component left with tensors on the meta device: its safetensors lack them (or ``model_index.json``
    gives it a class whose tensors the file does not hold), which diffusers only warns about; and one whose files
    store a floating-point parameter as integers or booleans (diffusers converts them to the model's dtype)."""
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        empty = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if empty:
            shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
            cls = index[name][1] if isinstance(index.get(name), list) else type(module).__name__
            raise CheckpointError(f"{root / name}: the weights hold no tensor for {len(empty)} of {cls}'s "
                                  f"parameters: {shown}")
        check_stored_kinds(root / name, {n for n, t in module.named_parameters() if t.is_floating_point()})


def check_stored_kinds(folder: Path, floating: set[str]) -> None:
    """No tensor of ``floating`` (parameter names) is stored as integers or booleans in ``folder``'s safetensors."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file()) if folder.is_dir() else []
    check_floating_stored(folder, files, floating)
