"""A :class:`PipelineSpec` read off a diffusers pipeline: which request fields its ``__call__`` takes,
their defaults, image or video output, and how a request becomes the call's keyword arguments."""

from __future__ import annotations

import inspect
from typing import Any

from ...errors import InvalidArgumentError
from ..base import GenerationRequest, PipelineSpec, check_int
from ..denoise import cpu_generators

# Request fields passed to ``__call__`` under the same name when the pipeline takes them.
CALL_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
               "max_sequence_length", "num_frames", "image", "true_cfg_scale")
MAX_FRAMES = 4096
MAX_TEXT_TOKENS = 1 << 16


def call_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def class_output_kind(class_name: str) -> str | None:
    """What a diffusers pipeline class makes, from its ``__call__`` alone (None: diffusers or the class is
    missing; loading it says why)."""
    try:
        import diffusers

        cls = getattr(diffusers, class_name)
        params = inspect.signature(cls.__call__).parameters
    except Exception:  # noqa: BLE001 - any failure here is reported by the load itself
        return None
    return "video" if "num_frames" in params else "image"


def output_kind(pipe, params: dict[str, inspect.Parameter]) -> str:
    """"video" for pipelines that take ``num_frames`` or post-process with a video processor, else "image"."""
    return "video" if "num_frames" in params or hasattr(pipe, "video_processor") else "image"


def _config(module, key: str):
    config = getattr(module, "config", None)
    return getattr(config, key, None) if config is not None else None


def _size_default(pipe, field: str) -> int | None:
    """What the pipeline falls back to for a ``None`` height or width, from the attributes diffusers
    pipelines compute it from (sample size times VAE scale factor), or None where it cannot be told."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    candidates = (
        (getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)),
        (_config(denoiser, f"sample_{field}"), getattr(pipe, "vae_scale_factor_spatial", None)),
        (_config(denoiser, "sample_size"), getattr(pipe, "vae_scale_factor", None)),
    )
    for size, factor in candidates:
        if isinstance(size, int) and isinstance(factor, int) and not isinstance(size, bool):
            return size * factor
    return None


def call_defaults(pipe, params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """The request defaults: the ``__call__`` defaults of the fields it takes (a ``None`` size as the
    pipeline computes it); fields left ``None`` are the pipeline's to choose."""
    defaults: dict[str, Any] = {}
    for field in CALL_FIELDS:
        param = params.get(field)
        if param is None or field in ("prompt", "negative_prompt", "image"):
            continue
        value = None if param.default is inspect.Parameter.empty else param.default
        if value is None and field in ("height", "width"):
            value = _size_default(pipe, field)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            defaults[field] = value
    return defaults


def image_input(params: dict[str, inspect.Parameter]) -> str:
    param = params.get("image")
    if param is None:
        return "none"
    return "required" if param.default is inspect.Parameter.empty else "optional"


def validate(spec: PipelineSpec, params: dict[str, inspect.Parameter], request: GenerationRequest) -> None:
    """Refuse request fields the pipeline does not take (naming them and what it takes), and check the
    integer fields the common validation leaves to the family."""
    taken = [f for f in CALL_FIELDS if f in params]
    for field in CALL_FIELDS:
        if getattr(request, field) is not None and field not in params:
            raise InvalidArgumentError(field, f"{spec.pipeline_class} does not take {field}; the request fields it "
                                       f"takes: {', '.join(taken + ['seed'])}")
    if request.seed is not None and "generator" not in params:
        raise InvalidArgumentError("seed", f"{spec.pipeline_class} takes no generator, so a seed cannot be applied")
    if request.num_frames is not None:
        check_int("num_frames", request.num_frames, 1, MAX_FRAMES)
    if request.max_sequence_length is not None:
        check_int("max_sequence_length", request.max_sequence_length, 1, MAX_TEXT_TOKENS)


def call_kwargs(params: dict[str, inspect.Parameter], state: dict[str, Any]) -> dict[str, Any]:
    """``__call__``'s keyword arguments for a resolved request: the fields that are set, the seeds as CPU
    generators (one per prompt, as a diffusers user seeds a batch), numpy output, a tuple result."""
    kwargs = {f: state[f] for f in CALL_FIELDS if f in params and state.get(f) is not None}
    prompts = state["prompt"]
    kwargs["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    negative = kwargs.get("negative_prompt")
    if isinstance(negative, list) and len(negative) == 1 and len(prompts) > 1:
        kwargs["negative_prompt"] = negative * len(prompts)
    if "generator" in params:
        generators = cpu_generators(state["seeds"])
        kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    if "output_type" in params:
        kwargs["output_type"] = "np"
    if "return_dict" in params:
        kwargs["return_dict"] = False
    return kwargs


def build_spec(pipe, build_stages) -> tuple[PipelineSpec, dict[str, inspect.Parameter]]:
    """The spec of a loaded diffusers pipeline; ``build_stages`` makes its (one, self-timed) stage."""
    params = call_parameters(pipe)
    if "prompt" not in params:
        raise InvalidArgumentError("model", f"{type(pipe).__name__}.__call__ takes no prompt; diffc serves "
                                   "text-conditioned pipelines")
    spec = PipelineSpec(
        family="generic",
        pipeline_class=type(pipe).__name__,
        output=output_kind(pipe, params),
        components=tuple(k for k, v in pipe.components.items() if v is not None),
        defaults=call_defaults(pipe, params),
        build_stages=build_stages,
        validate=lambda p, request: validate(p.spec, params, request),
        uses_negative_prompt="negative_prompt" in params,
        true_cfg="true_cfg_scale" in params,
        image_input=image_input(params),
        max_images=1,
    )
    return spec, params

