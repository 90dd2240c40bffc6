"""Load a diffusers-format folder whose pipeline class diffc has no native spec for, with diffusers itself.

diffusers is an optional dependency (``pip install 'diffc[diffusers]'``). Before diffusers sees the
folder, ``model_index.json`` is checked so that loading runs no code from it: the pipeline class must
be one diffusers ships, every component must come from diffusers or transformers (never a module in
the folder), and weights load with ``use_safetensors=True`` and ``trust_remote_code=False``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, DiffcError

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
        if len(entry) != 2:
            raise CheckpointError(f"{where}: component {name!r} must be [library, class], got {entry!r}")
        library, class_name = entry
        if library is None and class_name is None:
            continue  # an optional component left out
        known = library in LIBRARIES or (isinstance(library, str) and library.isidentifier()
                                         and hasattr(diffusers.pipelines, library))
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


@contextlib.contextmanager
def quiet_loading(diffusers):
    """diffusers' and transformers' loading progress bars off while diffc loads (their state restored after)."""
    import transformers

    libraries = [diffusers.utils.logging, transformers.utils.logging]
    were = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, were):
            if was:
                lib.enable_progress_bar()


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

    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"  # renamed in diffusers 0.42
    try:
        with quiet_loading(diffusers):
            pipe = cls.from_pretrained(str(root), use_safetensors=True, trust_remote_code=False,
                                       local_files_only=True, **{dtype_key: dtype})
    except (OSError, ValueError, EnvironmentError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{root}: diffusers could not load {cls.__name__} ({type(exc).__name__}: {first}); "
                              "weights must be safetensors") from exc
    if offload == "none":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
