"""``diffc.load``: read a diffusers-format checkpoint directory into a native pipeline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidArgumentError
from ..pipelines.base import Pipeline, PipelineSpec, pipeline_spec, supported_pipelines
from ..models.registry import IMAGE_ENCODERS, TEXT_ENCODERS
from ..pipelines.schedulers.choice import SCHEDULER_NAMES, choose_scheduler
from ..runtime.executor import Executor
from ..runtime.options import RuntimeOptions, check_runtime_device
from ..checkpoints import component_entry, read_json
from .components import check_component, load_component

log = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("device", f"'{device}' is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InvalidArgumentError("device", f"'{device}' is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device", "CUDA was requested but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError("device", f"cuda:{dev.index} does not exist ({torch.cuda.device_count()} GPUs)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidArgumentError("dtype", f"{dtype} is not supported; use bf16, fp16 or fp32")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidArgumentError("dtype", f"'{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_index(root: Path) -> tuple[dict, PipelineSpec | None]:
    """``root``'s ``model_index.json`` and the native spec of the pipeline it names, None for a pipeline
    the generic (diffusers) backend runs (nothing else is read)."""
    try:
        found = root.is_dir()
    except OSError as exc:  # a name too long, ...
        raise CheckpointError(f"{str(root)[:200]}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not found:
        raise CheckpointError(f"checkpoint directory not found: {root}")
    index = read_json(root / "model_index.json")
    class_name = index.get("_class_name")
    if not class_name:
        raise CheckpointError(f"{root / 'model_index.json'}: no pipeline class (_class_name)")
    if not isinstance(class_name, str) or class_name not in supported_pipelines():
        # the generic backend reads (and refuses, naming it) anything that is not a native pipeline
        return index, None
    spec = pipeline_spec(class_name)
    if spec.check_index is not None:
        spec.check_index(index)
    return index, spec


def native_components(root: Path, index: dict, spec: PipelineSpec) -> dict[str, str]:
    """The components a native pipeline loads, by name: their classes, each entry, folder and class checked
    (nothing is read from the folders)."""
    found = {}
    optional = tuple(n for n in spec.optional_components if isinstance(index.get(n), list) and index[n][1:2] != [None])
    for name in spec.components + optional:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise CheckpointError(f"{root / 'model_index.json'}: component '{name}' is missing or empty")
        found[name] = component_entry(root / "model_index.json", name, entry)[1]
        check_component(root, name, found[name])
    return found


def check_checkpoint(path: str | Path) -> None:
    """What :func:`load` checks before reading any weights: the folder, ``model_index.json``, its pipeline and, for a
    native one, each component's entry, folder and class (``diffc serve`` asks before binding its port). A generic
    pipeline's components are diffusers' to read."""
    root = Path(path).expanduser()
    index, spec = read_index(root)
    if spec is not None:
        native_components(root, index, spec)


# the keyword-only options of :func:`load` (``diffc.load`` names them when it is given another)
RUNTIME_KEYWORDS = ("offload", "offload_prefetch", "resident_blocks", "cuda_graphs", "compiled")


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         scheduler: str | None = None, *, offload: str = "none", offload_prefetch: int = 1,
         resident_blocks: int | None = None, cuda_graphs: bool | None = None,
         compiled: str | Path | None = None) -> Pipeline:
    """Load a diffusers-format pipeline directory (``model_index.json`` + one folder per component).

    A pipeline class with a native diffc spec (FLUX.1, Wan2.1) loads natively; any other diffusers
    pipeline loads through diffusers itself on the generic backend (``diffc.pipelines.generic``).

    ``device`` defaults to CUDA when available; ``dtype`` to bf16 on GPU and fp32 on CPU;
    ``scheduler`` ("unipc" or "euler") replaces the checkpoint's sampler where that makes sense.
    ``offload``, ``offload_prefetch``, ``resident_blocks`` and ``cuda_graphs`` are the runtime
    options (``diffc.runtime.options.RuntimeOptions``); CUDA graphs default to on for a GPU.
    ``compiled`` is an artifact written by ``diffc compile`` for this checkpoint: its graphs replace
    the eager DiT for the shapes it was compiled for (checked against this machine and model first).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InvalidArgumentError("path", f"must be a checkpoint folder (a str or a path), got {path!r}"[:200])
    root = Path(path).expanduser()
    index, spec = read_index(root)
    if spec is None:
        return load_generic(root, index, device, dtype, scheduler, compiled,
                            RuntimeOptions(offload=offload, offload_prefetch=offload_prefetch,
                                           resident_blocks=resident_blocks, cuda_graphs=cuda_graphs))
    options = RuntimeOptions(offload=offload, offload_prefetch=offload_prefetch, resident_blocks=resident_blocks,
                             cuda_graphs=cuda_graphs)
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES):
        raise InvalidArgumentError("scheduler", f"'{scheduler}' is not a scheduler; accepted: {', '.join(SCHEDULER_NAMES)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runtime_device(options, dev)
    checked = None if compiled is None else check_compiled(compiled, root, dev, dt)

    components = {}
    for name, class_name in native_components(root, index, spec).items():
        log.info("loading %s (%s)", name, class_name)
        components[name] = load_component(root, name, class_name, dev, dt)
    if "scheduler" in components:
        components["scheduler"] = choose_scheduler(components["scheduler"], scheduler)
    text_encoders = tuple(n for n in components if index[n][1] in TEXT_ENCODERS + IMAGE_ENCODERS)
    executor = Executor(components, dev, options, text_encoders)
    config = {k: index.get(k) for k in spec.index_keys}
    pipe = Pipeline(spec, components, dev, dt, source=str(root), executor=executor, runtime_options=options,
                    config=config)
    if compiled is not None:
        pipe.load_compiled(checked)
    return pipe


def check_compiled(compiled, root: Path, device: torch.device, dtype: torch.dtype):
    """``compiled`` is an artifact path that fits this machine, diffc, dtype and checkpoint: every check that needs
    no loaded model, run before any weight loads (a wrong artifact is not found only after minutes of loading); the
    checked artifact, which ``Pipeline.load_compiled`` then installs without checking it again."""
    if not isinstance(compiled, (str, os.PathLike)) or not str(compiled).strip():
        raise InvalidArgumentError("compiled", f"must be the path of an artifact written by `diffc compile`, got "
                                   f"{compiled!r}"[:200])
    from ..runtime.artifacts import check_artifact

    return check_artifact(compiled, source=root, device=device, dtype=dtype)


def load_generic(root: Path, index: dict, device, dtype, scheduler: str | None, compiled,
                 options: RuntimeOptions) -> Pipeline:
    """The generic backend: the diffusers pipeline ``model_index.json`` names, loaded by diffusers."""
    from ..pipelines.generic import GenericPipeline, import_diffusers, load_diffusers_pipeline

    import_diffusers()
    if scheduler is not None:
        raise InvalidArgumentError("scheduler", f"'{index.get('_class_name')}' runs on the generic (diffusers) backend, "
                                   "which uses the checkpoint's own scheduler; leave --scheduler unset")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runtime_device(options, dev)
    checked = None if compiled is None else check_compiled(compiled, root, dev, dt)
    pipe = GenericPipeline(load_diffusers_pipeline(root, index, dev, dt, options.offload), dev, dt, source=str(root),
                           runtime_options=options)
    if compiled is not None:
        pipe.load_compiled(checked)
    return pipe
