"""A diffusers pipeline behind diffc's :class:`~diffc.pipelines.base.Pipeline` interface.

``generate()`` runs one stage, ``diffusers_call``, that calls the diffusers pipeline once with the
request mapped onto its own ``__call__`` arguments (:mod:`.spec`) and times its phases from the outside
(:mod:`.timing`): the same seed gives diffusers' own output. The CLI, the server and the perf dump see
a ``Pipeline`` like any native one, and ``compile()`` (``diffc compile``, ``--compile``, ``--compiled``)
traces the diffusers transformer as it is: assigning ``components["transformer"]`` sets the module the
diffusers pipeline calls.
"""

from __future__ import annotations

import collections.abc
import contextlib
import logging
import re
from typing import Any, Iterator

import numpy as np
import torch

from ...errors import InvalidArgumentError
from ...runtime.executor import Executor
from ...runtime.options import RuntimeOptions
from ..base import Pipeline
from ..stages import RunContext, Stage, note_non_finite
from .loader import text_encoder_names
from .lora import diffusers_lora_converter
from .spec import CALL_FIELDS, build_spec, call_kwargs
from .timing import instrument

INPUTS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seeds",
          "num_frames", "max_sequence_length", "image")


class DiffusersComponents(collections.abc.MutableMapping):
    """The diffusers pipeline's components as diffc's ``components`` dict: reading ``"transformer"``
    gives ``pipe.transformer``, and assigning it (the executor installing its ``DiTStack``) sets the
    attribute the diffusers pipeline calls."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getitem__(self, name: str):
        if name not in self.pipe.components:
            raise KeyError(name)
        return getattr(self.pipe, name)

    def __setitem__(self, name: str, value) -> None:
        if name not in self.pipe.components:
            raise KeyError(f"{type(self.pipe).__name__} has no component {name!r}")
        setattr(self.pipe, name, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("components of a diffusers pipeline cannot be removed")

    def __iter__(self) -> Iterator[str]:
        return iter(self.pipe.components)

    def __len__(self) -> int:
        return len(self.pipe.components)


class GenericExecutor(Executor):
    """The runtime executor over a diffusers pipeline's components (offload keeps the transformers
    models in host memory between uses, as it does a native pipeline's text encoders); its
    ``describe()`` (the perf dump's ``runtime``) also names the backend, the pipeline class and
    diffusers' version under ``generic``. The encoders replay CUDA graphs as a native pipeline's do:
    assigning ``components[name]`` sets the attribute the diffusers pipeline calls (as for the transformer's
    ``DiTStack``)."""

    def __init__(self, pipe, components: DiffusersComponents, device: torch.device, options: RuntimeOptions):
        import diffusers

        self.generic = {"backend": "diffusers", "pipeline_class": type(pipe).__name__,
                        "diffusers": diffusers.__version__}
        super().__init__(components, device, options, text_encoder_names(pipe))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generic": dict(self.generic)}


def pin_execution_device(pipe, device: torch.device) -> None:
    """Make ``pipe`` create its latents and inputs on ``device`` wherever its weights are.

    diffusers infers the device a call runs on from where the components' weights are (or from
    accelerate's offload hooks); under diffc's offload they sit in host memory between uses, so the
    instance's class becomes a subclass of its own (same name) whose ``_execution_device`` is ``device``.
    """
    cls = type(pipe)
    if getattr(cls, "_diffc_device", None) == device:
        return
    base = cls.__dict__.get("_diffc_base", cls)
    pipe.__class__ = type(base.__name__, (base,), {
        "_diffc_base": base, "_diffc_device": device, "__module__": base.__module__, "__doc__": base.__doc__,
        "_execution_device": property(lambda self: self._diffc_device)})


def _field_in(message: str) -> str:
    """The request field a diffusers ``check_inputs`` message is about (it names arguments in backticks)."""
    for name in re.findall(r"`(\w+)`", message) + re.findall(r"\b(\w+)\b", message):
        if name.lower() in CALL_FIELDS:
            return name.lower()
    return "request"


def _checked(check):
    """``check_inputs`` whose ``ValueError`` / ``TypeError`` becomes an ``InvalidArgumentError`` naming the field."""

    def wrapped(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            message = " ".join(str(exc).split())
            raise InvalidArgumentError(_field_in(message), message) from None

    return wrapped


def to_uint8(output, kind: str, non_finite: list[bool] | None = None) -> list[np.ndarray]:
    """The pipeline's output as uint8 arrays: images (H, W, 3), videos (F, H, W, 3), rounded as diffusers'
    ``numpy_to_pil`` rounds; ``non_finite`` gets, per item, whether its float pixels held NaN or inf."""
    if isinstance(output, torch.Tensor):
        raise InvalidArgumentError("output_type", "the pipeline returned tensors although numpy output was asked for")
    arrays = []
    for item in output:  # a batch: numpy (B, ...) or a list of PIL images / frame lists
        if isinstance(item, (list, tuple)):  # a video as a list of frames (PIL images or arrays)
            item = np.stack([np.asarray(frame) for frame in item])
        else:
            item = np.asarray(item)
        finite = True
        if item.dtype != np.uint8:
            item = item.astype(np.float32)
            finite = bool(np.isfinite(item).all())
            with np.errstate(invalid="ignore"):  # NaN casts to 0: reported through non_finite instead
                item = (np.clip(item, 0.0, 1.0) * 255).round().astype(np.uint8)
        if non_finite is not None:
            non_finite.append(not finite)
        if item.shape[-1] == 1:
            item = np.repeat(item, 3, axis=-1)
        if item.shape[-1] == 4:
            item = item[..., :3]
        want = 3 if kind == "image" else 4
        if item.ndim != want:
            raise InvalidArgumentError("output", f"expected {kind} arrays with {want} dimensions, got shape {item.shape}")
        arrays.append(np.ascontiguousarray(item))
    return arrays


def _unused_negative_prompt(params: dict[str, Any], state: dict[str, Any]) -> str | None:
    """The warning for a negative prompt the call will not use: diffusers pipelines use it only with classifier-free
    guidance on, ``true_cfg_scale > 1`` where they take one, else ``guidance_scale > 1``."""
    if state.get("negative_prompt") is None or "negative_prompt" not in params:
        return None
    field = "true_cfg_scale" if "true_cfg_scale" in params else "guidance_scale"
    value = state.get(field)
    if value is None:
        value = params[field].default if field in params else None
    if isinstance(value, (int, float)) and value <= 1:
        return f"negative_prompt is ignored: {field} {value:g} turns classifier-free guidance off (give more than 1)"
    return None


class _WarningsTo(logging.Handler):
    """Collects the warnings diffusers logs during one call (prompt truncation, ignored options) into the
    generation's warnings, as native pipelines report theirs."""

    def __init__(self, warnings: list[str]):
        super().__init__(logging.WARNING)
        self.warnings = warnings

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        if message.startswith("The following part of your input was truncated"):
            # diffusers quotes the dropped text of every prompt of the batch: keep the reason, not other prompts
            message = "part of a prompt was truncated" + message.split(" was truncated", 1)[1].split(": [", 1)[0]
        if message not in self.warnings:
            self.warnings.append(message)


@contextlib.contextmanager
def diffusers_warnings(warnings: list[str]) -> Iterator[None]:
    handler, logger = _WarningsTo(warnings), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class GenericPipeline(Pipeline):
    """A diffusers pipeline run by diffc (see the module docstring). Build it with ``diffc.load``."""

    def __init__(self, diffusers_pipe, device: torch.device, dtype: torch.dtype, source: str = "",
                 runtime_options: RuntimeOptions | None = None):
        self.diffusers_pipe = diffusers_pipe
        spec, self.call_parameters = build_spec(diffusers_pipe, self._stages)
        options = runtime_options or RuntimeOptions()
        pin_execution_device(diffusers_pipe, device)
        components = DiffusersComponents(diffusers_pipe)
        super().__init__(spec, components, device, dtype, source=source, runtime_options=options,
                         executor=GenericExecutor(diffusers_pipe, components, device, options))

    def _stages(self):
        outputs = ("images",) if self.spec.output == "image" else ("videos",)
        return [Stage("diffusers_call", self._call, INPUTS, outputs, timed=False)]

    def _call(self, ctx: RunContext, state: dict[str, Any]) -> dict[str, Any]:
        pipe = self.diffusers_pipe
        kwargs = call_kwargs(self.call_parameters, state)
        check = getattr(pipe, "check_inputs", None)
        unused = _unused_negative_prompt(self.call_parameters, state)
        if unused:
            ctx.warnings.append(unused)
        with instrument(pipe, ctx), diffusers_warnings(ctx.warnings):
            if callable(check):
                pipe.__dict__["check_inputs"] = _checked(check)
            try:
                result = pipe(**kwargs)
            except InvalidArgumentError:
                raise
            except ValueError as exc:  # diffusers' own checks past check_inputs (a size past pos_embed_max_size)
                message = " ".join(str(exc).split())[:500]
                raise InvalidArgumentError(_field_in(message), f"{self.spec.pipeline_class} refused it: "
                                                               f"{message}") from None
            finally:
                pipe.__dict__.pop("check_inputs", None)
        output = result[0] if isinstance(result, tuple) else getattr(result, "images", getattr(result, "frames", None))
        key = "images" if self.spec.output == "image" else "videos"
        non_finite: list[bool] = []
        arrays = to_uint8(output, self.spec.output, non_finite)
        note_non_finite(ctx, non_finite)
        asked = state.get("num_frames")
        if key == "videos" and asked is not None and arrays and arrays[0].shape[0] != asked:
            ctx.warnings.append(f"num_frames: {asked} asked for, {self.spec.pipeline_class} made {arrays[0].shape[0]} "
                                "(it rounds the count to the frames its VAE decodes)")
        return {key: arrays}

    def lora_file_converter(self):
        """LoRA files go through the diffusers pipeline class's own ``lora_state_dict`` (:mod:`.lora`)."""
        return diffusers_lora_converter(type(self.diffusers_pipe))

    def __repr__(self) -> str:
        return (f"GenericPipeline({self.spec.pipeline_class} via diffusers, device={self.device}, dtype={self.dtype}, "
                f"output={self.spec.output})")
