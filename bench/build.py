"""Real-size pipelines with random weights: built with diffusers' and transformers' own classes directly on
the device in the benchmark dtype, saved once in diffusers layout, or shared in memory with diffc's models."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from diffc.models import registry

from .families import FAMILIES
from .measure import GB, free_memory
from .specs import BenchSpec

MARKER = "diffc_bench.json"  # written last: a directory without it is incomplete
MARKER_VERSION = 1


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fp32_names(model_cls) -> tuple[str, ...]:
    return tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())


def keep_fp32(model: torch.nn.Module) -> None:
    """Upcast what the model class keeps in float32, as ``from_pretrained`` does for a half-precision load."""
    names = _fp32_names(type(model))
    for full_name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if any(n in full_name.split(".") for n in names) and tensor.is_floating_point():
            tensor.data = tensor.data.float()


def build_diffusers_models(spec: BenchSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The DiT and VAE as diffusers modules, random weights, built in place on ``device`` in ``dtype``."""
    import diffusers

    family = FAMILIES[spec.family]
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        transformer = getattr(diffusers, family.diffusers_transformer).from_config(spec.transformer.to_dict())
        vae = getattr(diffusers, family.diffusers_vae).from_config(spec.vae.to_dict())
    models = {"transformer": transformer, "vae": vae}
    for model in models.values():
        keep_fp32(model)
        model.eval().requires_grad_(False)
    return models


def build_diffusers_pipeline(spec: BenchSpec, device: torch.device, dtype: torch.dtype, tok_dir: Path):
    """The whole diffusers pipeline with random weights (text encoders at their real size)."""
    import diffusers
    import transformers

    from diffc.demo.qwen_tokenizer import train_qwen2_tokenizer, train_qwen_tokenizer
    from diffc.demo.tokenizers import train_clip_tokenizer, train_llama_tokenizer, train_t5_tokenizer

    trainers = {"clip": train_clip_tokenizer, "t5": train_t5_tokenizer, "llama": train_llama_tokenizer,
                "qwen": train_qwen_tokenizer, "qwen2": train_qwen2_tokenizer}
    components: dict[str, Any] = build_diffusers_models(spec, device, dtype)
    torch.manual_seed(1)
    for te in spec.text_encoders:
        components[te.tokenizer_component] = trainers[te.tokenizer_kind](tok_dir / te.tokenizer_component)
        config = getattr(transformers, te.config_class)(**te.config)
        with torch.device(device), default_dtype(dtype):
            components[te.component] = getattr(transformers, te.model_class)(config).eval().requires_grad_(False)
    scheduler_cls = getattr(diffusers, spec.scheduler["_class_name"])
    components["scheduler"] = scheduler_cls.from_config({k: v for k, v in spec.scheduler.items() if k != "_class_name"})
    pipe = getattr(diffusers, FAMILIES[spec.family].diffusers_pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_like(diffusers_model: torch.nn.Module, class_name: str, config) -> torch.nn.Module:
    """diffc's model holding the very same tensors as ``diffusers_model`` (built on meta, then assigned)."""
    cls = registry.native_model_class(class_name)
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(diffusers_model.state_dict(), strict=True, assign=True)
    device = next(diffusers_model.parameters()).device
    if hasattr(model, "init_non_persistent_buffers"):
        model.init_non_persistent_buffers(device)
    return model.eval().requires_grad_(False)


def _marker(spec: BenchSpec, dtype: torch.dtype) -> dict[str, Any]:
    return {"version": MARKER_VERSION, "spec": spec.to_dict(), "dtype": str(dtype)}


def _is_bench_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def _dir_size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GB


def _make_room(root: Path, need_gb: float, log) -> None:
    """Free disk for ``need_gb``: remove other benchmark checkpoints (marked ones) beside ``root``."""
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(parent).free / GB
    if free_gb >= need_gb:
        return
    for other in sorted(parent.iterdir()):
        if other != root and other.is_dir() and (_is_bench_checkpoint(other) or other.name.endswith(".partial")):
            log(f"removing old benchmark checkpoint {other} ({_dir_size_gb(other):.1f} GB) to make room")
            shutil.rmtree(other, ignore_errors=True)
            free_gb = shutil.disk_usage(parent).free / GB
            if free_gb >= need_gb:
                return
    raise RuntimeError(f"not enough disk for the checkpoint in {parent}: need {need_gb:.1f} GB, "
                       f"{free_gb:.1f} GB free; use --ckpt-dir on a larger disk or --skip-e2e")


def ensure_checkpoint(spec: BenchSpec, root: Path, device: torch.device, dtype: torch.dtype,
                      rebuild: bool = False, log=print) -> dict[str, Any]:
    """Make sure ``root`` holds this spec's pipeline in diffusers layout; build and save it if not.

    Reuses a directory whose marker matches the spec and dtype. Writes into ``<root>.partial`` and
    renames at the end, so an interrupted build never looks complete.
    """
    root = Path(root)
    marker = _marker(spec, dtype)
    if root.exists() and not _is_bench_checkpoint(root) and any(root.iterdir()):
        raise RuntimeError(f"{root} exists and is not a diffc benchmark checkpoint; choose another --ckpt-dir")
    if _is_bench_checkpoint(root) and not rebuild:
        if json.loads((root / MARKER).read_text()) == json.loads(json.dumps(marker)):
            log(f"reusing checkpoint {root}")
            return {"path": str(root), "built": False, "size_gb": _dir_size_gb(root)}
        log(f"{root} holds another spec or dtype: rebuilding")

    start = time.perf_counter()
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="diffc-bench-tok-") as tok:
        pipe = build_diffusers_pipeline(spec, device, dtype, Path(tok))
        n_bytes = sum(t.numel() * t.element_size() for m in pipe.components.values()
                      if isinstance(m, torch.nn.Module) for t in m.state_dict().values())
        log(f"built {spec.name} with random weights on {device} ({n_bytes / GB:.1f} GB) "
            f"in {time.perf_counter() - start:.0f} s; saving to {root}")
        _make_room(root, n_bytes / GB * 1.05 + 1.0, log)
        pipe.save_pretrained(str(partial), safe_serialization=True)
    del pipe
    free_memory(device)
    (partial / MARKER).write_text(json.dumps(marker, indent=1))
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    seconds = time.perf_counter() - start
    log(f"checkpoint ready in {seconds:.0f} s")
    return {"path": str(root), "built": True, "build_s": seconds, "size_gb": _dir_size_gb(root)}
