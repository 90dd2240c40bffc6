"""Load one pipeline component (native model, transformers text encoder, tokenizer, scheduler)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..checkpoints import check_floating_stored, check_tokenizer_folder, first_line as _first_line, read_json
from ..errors import CheckpointError, WeightMismatchError
from ..models import registry
from ..models.config import check_size_fields
from ..stored import StoredWeights, attach
from .weights import iter_tensors, tensor_shapes, weight_files

log = logging.getLogger(__name__)


def _fp32_matcher(model_cls) -> "callable[[str], bool]":
    fragments = tuple(getattr(model_cls, "_keep_in_fp32_modules", ()) or ())

    def keep_fp32(name: str) -> bool:
        parts = name.split(".")
        return any(frag in parts or f".{frag}." in f".{name}" for frag in fragments)

    return keep_fp32


def load_native_model(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype):
    """Build a native model on the meta device and assign the checkpoint's tensors by name."""
    model_cls = registry.native_model_class(class_name)
    config = model_cls.config_class.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    files = weight_files(folder)

    with torch.device("meta"):
        model = model_cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    present = tensor_shapes(files)
    if expected.keys() != present.keys():
        raise WeightMismatchError(folder.name, sorted(expected.keys() - present.keys()),
                                  sorted(present.keys() - expected.keys()))
    # kinds first: a packed kind (F4) gives its shape in elements, not as torch reads it
    check_floating_stored(folder, files, {name for name, t in model.state_dict().items() if t.is_floating_point()})
    wrong = [f"{n} {list(present[n])} (config.json gives {list(s)})" for n, s in expected.items() if present[n] != s]
    if wrong:
        raise CheckpointError(f"{folder}: {len(wrong)} weight shape(s) do not match config.json: "
                              + "; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else ""))

    keep_fp32 = _fp32_matcher(model_cls)
    files_of: dict[str, Path] = {}
    state = dict(iter_tensors(files, device, lambda n: torch.float32 if keep_fp32(n) else dtype, stored=files_of))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if device.type != "meta":  # the parameters still equal to their file tensors (diffc.stored)
        stored = StoredWeights()
        for name, param in model.named_parameters():
            if name in files_of:
                stored.add(name, files_of[name], name, param)
        attach(model, stored)

    if hasattr(model, "init_non_persistent_buffers"):
        model.init_non_persistent_buffers(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{folder.name}: tensors left uninitialised after loading: {', '.join(leftover[:10])}")
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own load report off while a text encoder loads (a table of missing and unexpected keys, 'a
    model of type X to instantiate a model of type Y'): diffc checks the same and says it in one line."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(was)


def load_text_encoder(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype):
    """Load a transformers text encoder straight onto ``device`` (transformers honours the model's fp32 modules)."""
    import transformers

    check_size_fields(read_json(folder / "config.json"), str(folder / "config.json"))
    files = weight_files(folder)  # clear error for missing weights or shards before transformers reports its own
    check_floating_stored(folder, files, None)  # no complex or packed kinds, which transformers would cast
    cls = getattr(transformers, class_name)
    device_map = None if device.type == "cpu" else {"": str(device)}
    try:
        # safetensors only: a folder whose only weights transformers would take are a pickle is refused
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(folder), dtype=dtype, device_map=device_map, output_loading_info=True,
                                              use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: cannot load {class_name} with safetensors weights ({reason})") from None
    missing = list(info.get("missing_keys", ()))
    unexpected = list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise WeightMismatchError(folder.name, missing, unexpected)
    # transformers casts integers the file holds for a floating parameter to the model's dtype without a word (the
    # file's names may carry the model's base prefix or not)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    floating = {n for n, t in model.named_parameters() if t.is_floating_point()}
    check_floating_stored(folder, files, floating | {prefix + n for n in floating}
                          | {n.removeprefix(prefix) for n in floating})
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: Path, class_name: str):
    import transformers

    if not folder.is_dir():
        raise CheckpointError(f"missing folder: {folder}")
    check_tokenizer_folder(folder)
    cls = getattr(transformers, class_name, None) or transformers.AutoTokenizer
    try:
        # never code from the folder: a tokenizer_config.json naming a class of its own .py files (auto_map) made
        # transformers ask "Do you wish to run the custom code? [y/N]" on the terminal, and run it on a yes
        return cls.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer {class_name} ({_first_line(exc)})") from None


def load_image_processor(folder: Path, class_name: str):
    """An image processor from its ``preprocessor_config.json`` (JSON only), on transformers' PIL backend."""
    import transformers

    config = folder / "preprocessor_config.json"
    read_json(config)  # a clear error for a missing or malformed file
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or getattr(transformers, class_name)
    try:
        return cls.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: cannot load image processor {class_name} ({_first_line(exc)})") from None


def load_scheduler(folder: Path, class_name: str):
    path = folder / "scheduler_config.json"
    cls = registry.scheduler_class(class_name)
    return cls.from_config(cls.config_class.from_dict(read_json(path), source=str(path)))


def check_component(root: Path, name: str, class_name: str) -> Path:
    """The component's folder, there, and its class one diffc loads (:func:`load_component` reads nothing else
    first): checked before any component loads, and by ``diffc serve`` before it binds its port."""
    folder = root / name
    if not folder.is_dir():
        problem = f"{folder} is not a folder" if folder.exists() else f"missing folder: {folder}"
        raise CheckpointError(f"{problem} (named '{name}' in model_index.json)")
    if not (registry.is_native_model(class_name) or registry.is_scheduler(class_name) or class_name in (
            registry.TEXT_ENCODERS + registry.TOKENIZERS + registry.IMAGE_ENCODERS + registry.IMAGE_PROCESSORS
            + registry.PROCESSORS)):
        supported = registry.supported_classes()
        listing = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in supported.items())
        raise CheckpointError(f"component '{name}' has unknown class '{class_name}'. Supported: {listing}")
    return folder


def load_component(root: Path, name: str, class_name: str, device: torch.device, dtype: torch.dtype):
    """Load the component ``name`` whose class ``model_index.json`` gives as ``class_name``."""
    folder = check_component(root, name, class_name)
    if registry.is_native_model(class_name):
        return load_native_model(folder, class_name, device, dtype)
    if class_name in registry.TEXT_ENCODERS:
        return load_text_encoder(folder, class_name, device, dtype)
    if class_name in registry.TOKENIZERS:
        return load_tokenizer(folder, class_name)
    if class_name in registry.IMAGE_ENCODERS:
        return load_text_encoder(folder, class_name, device, dtype)
    if class_name in registry.IMAGE_PROCESSORS:
        return load_image_processor(folder, class_name)
    if registry.is_scheduler(class_name):
        return load_scheduler(folder, class_name)
    from ..pipelines.qwen_vl import load_vl_processor  # registry.PROCESSORS: what check_component leaves

    return load_vl_processor(folder)
