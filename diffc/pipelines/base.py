"""Pipeline specs, requests and outputs; ``Pipeline.generate`` runs a family's stage graph."""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..fileio import IMAGE_SUFFIXES, atomic_write
from ..runtime.perf import PerfRecorder, Timings
from .images import validate_image
from .stages import RunContext, Stage, StageGraph

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1


@dataclasses.dataclass
class GenerationRequest:
    """One call to ``generate``. ``None`` fields take the family's defaults."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | list[int] | None = None
    num_frames: int | None = None
    max_sequence_length: int | None = None
    image: Any = None  # a PIL image (numpy array, torch tensor) or a list of them: editing / image-to-video input
    true_cfg_scale: float | None = None  # true classifier-free guidance (two DiT calls a step) where the family has it
    guidance_scale_2: float | None = None  # two-expert models (Wan2.2 A14B): the low-noise expert's scale
    # several samples of each prompt, as diffusers' argument of the same name (image models / video models): the
    # prompts are repeated (prompt-major) when the request is resolved; a list of seeds then has one per sample
    num_images_per_prompt: int | None = None
    num_videos_per_prompt: int | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything family-specific about a pipeline, as data plus a few functions.

    ``build_stages()`` returns the stage list; ``validate(pipe, request)`` raises
    ``InvalidArgumentError`` for requests the family cannot serve (after defaults are applied);
    ``check_index(model_index)`` raises ``CheckpointError`` for variants of the pipeline class that
    this spec does not implement.
    """

    family: str
    pipeline_class: str
    output: str  # "image" or "video"
    components: tuple[str, ...]
    defaults: dict[str, Any]
    build_stages: Callable[[], Sequence[Stage]]
    validate: Callable[["Pipeline", GenerationRequest], None]
    uses_negative_prompt: bool = False
    check_index: Callable[[dict[str, Any]], None] | None = None
    image_input: str = "none"  # "none", "optional" or "required": whether requests may carry ``image``
    max_images: int = 1  # input images one request may carry (when image_input is not "none")
    true_cfg: bool = False  # whether requests may set ``true_cfg_scale``
    optional_components: tuple[str, ...] = ()  # loaded when model_index.json names them (not null)
    index_keys: tuple[str, ...] = ()  # model_index.json settings the stages read (``ctx.config``)
    # the spec of one checkpoint, from its index_keys settings (e.g. Wan2.2 TI2V: an optional input image)
    for_config: Callable[[dict[str, Any]], "PipelineSpec"] | None = None
    # whether the DiT's shapes follow the prompt's length (its text tokens are part of the DiT's sequence)
    prompt_shapes: bool = False
    # tokens of the DiT's text sequence that one prompt fills, ``(pipe, prompt, max_sequence_length) -> int``, and
    # the multiple the sequence is padded to: a compile then covers every prompt (``prompt_lengths``)
    prompt_tokens: Callable[["Pipeline", str, int], int] | None = None
    prompt_multiple: int = 1
    # whether a checkpoint reads a request's second image as the video's last frame (``image=[first, last]``,
    # diffusers' ``last_image``): ``(pipe) -> ("none" | "optional" | "required", why)``; None: no checkpoint does
    last_frame: Callable[["Pipeline"], tuple[str, str]] | None = None


def last_frame_input(pipe) -> tuple[str, str]:
    """Whether ``pipe``'s checkpoint reads a last frame (``image=[first, last]``): ``"none"``, ``"optional"`` or
    ``"required"``, with why, as a clause the surfaces (``--last-image``, ``last_frame``) put in their errors."""
    spec = pipe.spec
    if getattr(spec, "last_frame", None) is None:
        return "none", (f"{spec.pipeline_class} takes no last frame (first-last-frame video: Wan2.1 FLF2V, "
                        "Wan2.2 I2V-A14B)")
    return spec.last_frame(pipe)


_SPECS = {
    "FluxPipeline": "diffc.pipelines.flux:FLUX_SPEC",
    "FluxKontextPipeline": "diffc.pipelines.flux_kontext:FLUX_KONTEXT_SPEC",
    "WanPipeline": "diffc.pipelines.wan:WAN_SPEC",
    "WanImageToVideoPipeline": "diffc.pipelines.wan_i2v:WAN_I2V_SPEC",
    "ZImagePipeline": "diffc.pipelines.zimage:ZIMAGE_SPEC",
    "QwenImagePipeline": "diffc.pipelines.qwen_image:QWEN_IMAGE_SPEC",
    "QwenImageEditPipeline": "diffc.pipelines.qwen_image_edit:QWEN_IMAGE_EDIT_SPEC",
    "QwenImageEditPlusPipeline": "diffc.pipelines.qwen_image_edit:QWEN_IMAGE_EDIT_PLUS_SPEC",
}


def supported_pipelines() -> tuple[str, ...]:
    return tuple(sorted(_SPECS))


def pipeline_spec(class_name: str) -> PipelineSpec:
    module, attr = _SPECS[class_name].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass
class GenerationOutput:
    """Images as PIL images (image models) or videos as uint8 arrays (frames, height, width, 3)."""

    images: list | None
    videos: list[np.ndarray] | None
    timings: Timings
    seeds: list[int]
    warnings: list[str]
    # warnings about one sample only, by sample index: ``warnings`` holds each as "prompt i <text>"
    sample_warnings: dict[int, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def frames(self) -> np.ndarray | None:
        """The first video's frames, (frames, height, width, 3) uint8."""
        return None if self.videos is None else self.videos[0]

    def save(self, path: str | Path, index: int = 0, fps: int = 16) -> Path:
        """Write image (or video) ``index`` to ``path``: an image as PNG, JPEG or WebP by its suffix, a video as
        MP4. Written to a temporary name beside ``path`` and renamed, so a failure leaves ``path`` as it was."""
        items = self.images if self.images is not None else self.videos
        check_int("index", index, 0, len(items) - 1)
        if self.images is None:
            from .video import write_video

            return write_video(Path(path).expanduser(), self.videos[index], fps=fps)
        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise InvalidArgumentError("path", f"images are written as {', '.join(IMAGE_SUFFIXES)} files, got "
                                               f"'{path.name}'")
        if path.is_dir():
            raise InvalidArgumentError("path", f"{path} is a directory; give a file name")
        image = self.images[index]
        return atomic_write(path, lambda tmp: image.save(tmp, format=IMAGE_SUFFIXES[suffix]))


def nearest_valid(value: int, step: int, offset: int = 0, minimum: int = 1) -> str:
    """The valid value(s) ``offset + k * step`` nearest to ``value``, as text ("81" or "77 or 81")."""
    below = max(minimum, (value - offset) // step * step + offset)
    above = below + step
    if value - below == above - value:
        return f"{below} or {above}"
    return str(below if value - below < above - value else above)


def check_int(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidArgumentError(field, f"must be an integer from {low} to {high}, got {value!r}")


def check_unicode(field: str, texts: list[str]) -> None:
    """Text a tokenizer can read: no lone surrogate (\\ud800-\\udfff), which is what Python makes of bytes that are
    not UTF-8 in a command line (``--prompt $'a\\xff'``) and what no tokenizer takes."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(field, f"is not valid Unicode text: it holds a lone surrogate {text[exc.start]!a} "
                                              f"at character {exc.start} (bytes that are not UTF-8?)") from None


def check_image_model_frames(request: GenerationRequest, family: str) -> None:
    """An image model takes no ``num_frames`` but its default, None or 1 (True and 1.0 included in neither)."""
    frames = request.num_frames
    if frames is not None and (type(frames) is not int or frames != 1):
        raise InvalidArgumentError("num_frames", f"{family} is an image model; num_frames is for video models")


MAX_PER_PROMPT = 64  # samples of one prompt in one call (as ``diffc compile --batch``'s limit)
PER_PROMPT_FIELDS = {"image": "num_images_per_prompt", "video": "num_videos_per_prompt"}


def repeat_per_prompt(request: GenerationRequest, output: str, pipeline_class: str) -> int:
    """Apply ``num_images_per_prompt`` (image models) or ``num_videos_per_prompt`` (video models): each prompt (and
    its negative prompt) repeated that many times in place, prompt-major as diffusers repeats its embeddings; the
    count (1 when unset). The prompts are checked first (:func:`validate_common`)."""
    field = PER_PROMPT_FIELDS.get(output, "num_images_per_prompt")
    for other in PER_PROMPT_FIELDS.values():
        if other != field and getattr(request, other) is not None:
            raise InvalidArgumentError(other, f"{pipeline_class} makes {output}s; use {field}")
    count = getattr(request, field)
    if count is None:
        return 1
    check_int(field, count, 1, MAX_PER_PROMPT)  # a NumPy integer is a Python int by now (plain_numbers)
    if count > 1:
        request.prompt = [p for p in request.prompts for _ in range(count)]
        if isinstance(request.negative_prompt, list):
            request.negative_prompt = [n for n in request.negative_prompt for _ in range(count)]
    return count


INT_FIELDS = ("height", "width", "num_inference_steps", "num_frames", "max_sequence_length", "num_images_per_prompt",
              "num_videos_per_prompt")
SCALE_FIELDS = ("guidance_scale", "guidance_scale_2", "true_cfg_scale")


def plain_numbers(request: GenerationRequest) -> None:
    """NumPy scalars (``np.int64`` from an array's shape, ``np.float32`` scales) as the Python numbers that the
    checks, the schedulers and the stages take: the checks accepted some and refused others ("must be an integer
    >= 1, got np.int64(2)"), and ``np.float32 * tensor`` is a NumPy array."""
    for field in INT_FIELDS:
        if isinstance(getattr(request, field, None), np.integer):
            setattr(request, field, int(getattr(request, field)))
    for field in SCALE_FIELDS:
        if isinstance(getattr(request, field, None), (np.integer, np.floating)):
            setattr(request, field, float(getattr(request, field)))


def validate_common(request: GenerationRequest, output: str = "image", pipeline_class: str = "this pipeline") -> None:
    """Checks every family shares: prompt, samples per prompt, sizes, steps, guidance, seeds."""
    prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InvalidArgumentError("prompt", "must be a non-empty string (or a list of them)")
    if request.negative_prompt is not None:
        negs = request.negative_prompt if isinstance(request.negative_prompt, list) else [request.negative_prompt]
        if not all(isinstance(n, str) for n in negs) or len(negs) not in (1, len(prompts)):
            raise InvalidArgumentError("negative_prompt", "must be a string or one string per prompt")
        check_unicode("negative_prompt", negs)
    per_prompt = repeat_per_prompt(request, output, pipeline_class)
    prompts = request.prompts
    check_unicode("prompt", prompts)
    for field, high in (("height", 16384), ("width", 16384), ("num_inference_steps", MAX_STEPS)):
        if getattr(request, field) is not None:  # None only where the pipeline picks its own (generic backend)
            check_int(field, getattr(request, field), 1, high)
    for field in ("guidance_scale", "guidance_scale_2"):
        g = getattr(request, field)
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                              or not 0 <= g <= 100):
            raise InvalidArgumentError(field, f"must be a number from 0 to 100, got {g!r}")
    seeds = request.seed if isinstance(request.seed, list) else [request.seed]
    if isinstance(request.seed, list) and len(seeds) != len(prompts):
        needs = (f"one per prompt ({len(prompts)})" if per_prompt == 1 else
                 f"one per sample ({len(prompts) // per_prompt} prompt(s) x {per_prompt} = {len(prompts)})")
        raise InvalidArgumentError("seed", f"a list of seeds needs {needs}, got {len(seeds)}")
    for s in seeds:
        if s is not None:
            check_int("seed", s, 0, MAX_SEED)


class Pipeline:
    """A loaded pipeline: its spec, components, device and dtype. Build it with ``diffc.load``."""

    def __init__(self, spec: PipelineSpec, components: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 source: str = "", executor: Any = None, runtime_options: Any = None,
                 config: dict[str, Any] | None = None):
        from ..runtime.executor import Executor
        from ..runtime.options import RuntimeOptions

        self.config = dict(config or {})  # the model_index.json settings named by spec.index_keys
        self.spec = spec.for_config(self.config) if spec.for_config is not None else spec
        self.runtime_options = runtime_options or RuntimeOptions()
        self.executor = executor or Executor(components, device, self.runtime_options)
        self.warmup_report: dict[str, Any] | None = None  # what load_compiled's warm-up ran
        self.components = components
        self.device = device
        self.dtype = dtype
        self.source = source
        self.graph = StageGraph(self.spec.build_stages(), request_keys=[f.name for f in dataclasses.fields(GenerationRequest)] + ["seeds"])

    def __repr__(self) -> str:
        return f"Pipeline({self.spec.pipeline_class}, device={self.device}, dtype={self.dtype}, stages={self.graph.names})"

    def resolve(self, **kwargs) -> GenerationRequest:
        """Fill a request's unset fields from the family defaults and validate it. ``last_image`` (diffusers' name
        for a first-last-frame video's last frame) joins ``image`` as ``image=[first, last]``."""
        if "last_image" in kwargs:
            kwargs = self._join_last_image(dict(kwargs))
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(GenerationRequest)}
        if unknown:
            raise InvalidArgumentError(sorted(unknown)[0], f"is not a generation option; accepted: "
                                       f"{', '.join(f.name for f in dataclasses.fields(GenerationRequest))}")
        request = GenerationRequest(**kwargs)
        for key, value in self.spec.defaults.items():
            if getattr(request, key) is None:
                setattr(request, key, value)
        plain_numbers(request)
        validate_common(request, self.spec.output, self.spec.pipeline_class)
        if request.guidance_scale_2 is not None and "transformer_2" not in self.components:
            raise InvalidArgumentError("guidance_scale_2", f"{self.spec.pipeline_class} has one denoiser; "
                                       "guidance_scale_2 only acts on two-expert models (transformer_2)")
        validate_image(self.spec, request)
        if request.true_cfg_scale is not None and not self.spec.true_cfg:
            raise InvalidArgumentError("true_cfg_scale", f"{self.spec.pipeline_class} has no true classifier-free "
                                       "guidance; use guidance_scale")
        if request.negative_prompt is not None and not self.spec.uses_negative_prompt:
            raise InvalidArgumentError("negative_prompt", f"{self.spec.pipeline_class} does not use a negative prompt")
        self.spec.validate(self, request)
        return request

    def _join_last_image(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        last = kwargs.pop("last_image")
        if last is None:
            return kwargs
        mode, why = last_frame_input(self)
        if mode == "none":
            raise InvalidArgumentError("last_image", why)
        first = kwargs.get("image")
        if isinstance(first, (list, tuple)) and len(first) == 1:
            first = first[0]
        if first is None or isinstance(first, (list, tuple)):
            raise InvalidArgumentError("last_image", "goes with one image, the first frame: image=FIRST, "
                                                     "last_image=LAST (or image=[FIRST, LAST])")
        kwargs["image"] = [first, last]
        return kwargs

    def compile(self, buckets: list[dict[str, Any]] | None = None, *, out: str | None = None, quality: str = "fast",
                disable: tuple[str, ...] = (), enable: tuple[str, ...] = (), attention: str = "auto",
                log: Callable[[str], None] = print):
        """Compile the DiT(s) for ``buckets`` (request fields: height, width, num_frames, guidance_scale,
        one prompt per image; ``prompt_lengths="all"``: one shape per padded text length, for models whose DiT
        holds the prompt at its own length), install the graphs, and write an artifact at ``out`` if given.

        ``buckets`` defaults to one bucket of the family's default size. Returns the
        ``diffc.compile.pipeline.CompileReport``.
        """
        from ..compile.pipeline import compile_pipeline
        from ..runtime.artifacts import compiled_layers

        requests = [dict(b) for b in (buckets if buckets is not None else [{}])]
        report, graphs = compile_pipeline(self, requests, out=out, tier=quality, disable=disable, enable=enable,
                                          attention=attention, log=log)
        self.executor.install_compiled(compiled_layers(graphs, {"artifact": report.artifact, "tier": quality}))
        return report

    def load_compiled(self, path, *, warmup: bool | None = None) -> dict[str, Any]:
        """Install the graphs of an artifact written by ``diffc compile`` (checked first); returns its manifest.
        ``path``: the artifact's folder, or what :func:`~diffc.runtime.artifacts.check_artifact` returned for it and
        this pipeline (not checked twice).

        ``warmup`` (default: on CUDA) runs each compiled shape's DiT call once now (kernel loads, GEMM plans,
        CUDA-graph capture) so the first generation is as fast as the next; ``warmup_report`` says what ran.
        """
        from ..runtime.artifacts import load_artifact
        from ..runtime.warmup import warm_up_compiled

        manifest = load_artifact(self.executor, path, source=self.source, device=self.device, dtype=self.dtype)
        if warmup is not False:
            self.warmup_report = warm_up_compiled(self, manifest, force=bool(warmup))
        return manifest

    def check_cache(self, cache: Any = None, cache_options: dict[str, Any] | None = None):
        """The :class:`~diffc.runtime.cache.CacheConfig` that ``cache``/``cache_options`` ask for (None: no
        cache), checked against this pipeline's DiT(s); raises ``InvalidArgumentError`` naming the option."""
        from ..runtime.cache import cache_config

        config = cache_config(cache, cache_options)
        if config is not None:
            self.executor.check_cache(config)
        return config
    @property
    def lora(self):
        """The pipeline's :class:`diffc.lora.LoraManager` (cached adapters, merge state, counters)."""
        from ..lora import manager_for

        return manager_for(self)

    def lora_file_converter(self):
        """What rewrites a LoRA file's tensors after reading, before diffc's converter (``LoraFile ->
        LoraFile``), or None: native pipelines map every format themselves (:mod:`diffc.lora.families`)."""
        return None

    def set_lora(self, nickname: str | list[str], path=None, strength: float | list[float] = 1.0,
                 target: str | list[str] = "all") -> dict[str, Any]:
        """Load LoRA adapters (or reuse cached ones by nickname), make them the active set and merge them.

        Each argument is a value or a list with one entry per adapter. ``path``: a ``.safetensors`` file
        or a folder holding one (any format diffusers accepts for the model); ``None`` reuses the cached
        adapter. ``target``: ``"all"``, ``"transformer"`` or ``"transformer_2"`` (Wan2.2). Adapters on one
        target are summed in order. Returns ``list_loras()``.
        """
        return self.lora.set(nickname, path, strength, target)

    def merge_lora_weights(self, strength: float | None = None, target: str = "all") -> dict[str, Any]:
        """Merge the active adapters again (after an unmerge), optionally at a new ``strength`` for all."""
        return self.lora.merge(strength, target)

    def unmerge_lora_weights(self, target: str = "all") -> dict[str, Any]:
        """Restore the original DiT weights bit-exactly; the adapters stay cached and set."""
        return self.lora.unmerge(target)

    def list_loras(self) -> dict[str, Any]:
        """Cached adapters (nickname, path, format, rank, warnings) and the active ones per component."""
        return self.lora.describe()

    def generate(self, prompt: str | list[str], *, progress: bool = True,
                 step_callback: Callable[[int, int], None] | None = None, cache: Any = None,
                 cache_options: dict[str, Any] | None = None,
                 decode_callback: Callable[[int, int], None] | None = None, **kwargs) -> GenerationOutput:
        """Generate from ``prompt`` with the request fields in ``kwargs`` (``GenerationRequest``).

        ``cache``: a step cache for this generation ("dbcache", "fbcache", "teacache", a
        ``CacheConfig``, or None/"none" for none) with ``cache_options`` (threshold, fn, bn, warmup_steps,
        max_skips_in_a_row, taylorseer, taylorseer_order, coefficients; see ``diffc.runtime.cache.config``).
        ``step_callback(done, total)`` follows the denoising steps, ``decode_callback(done, total)`` the VAE
        decode where the VAE reports it (the Wan VAE: per latent frame).
        The cache is installed for this call (kept while the next call asks for the same settings) and
        starts empty: no state passes from one generation to the next.
        """
        for field, callback in (("step_callback", step_callback), ("decode_callback", decode_callback)):
            if callback is not None and not callable(callback):
                raise InvalidArgumentError(field, f"must be a function (done, total) or None, got {callback!r}"[:200])
        request = self.resolve(prompt=prompt, **kwargs)
        cache_cfg = self.check_cache(cache, cache_options)
        seeds = request.seed if isinstance(request.seed, list) else [request.seed]
        if request.seed is None:  # one drawn per prompt: each image is made again alone with its seed
            seeds = [None] * len(request.prompts)
        seeds = [random.randrange(2**31) if s is None else int(s) for s in seeds]
        ctx = RunContext(self.components, self.device, self.dtype, PerfRecorder(self.device), progress=progress,
                         step_callback=step_callback, decode_callback=decode_callback, config=self.config)
        state = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        state["prompt"] = request.prompts
        state["seeds"] = seeds
        from ..runtime.compiled import fallback_warning

        compiled = self.executor.compiled()
        fallbacks = compiled.counters.eager_fallbacks if compiled is not None else 0
        self.executor.set_cache(cache_cfg)
        ctx.warnings += self.executor.cache_warnings()
        self.executor.begin_generation(request.num_inference_steps)
        ctx.step_hooks.append(self.executor.begin_step)
        try:
            with torch.inference_mode():
                state = self.graph.run(ctx, state)
        finally:
            self.executor.end_generation()
        if compiled is not None and (w := fallback_warning(compiled, fallbacks)):
            ctx.warnings.append(w)
        timings = ctx.perf.finish()
        timings.runtime = self.executor.describe()
        if self.spec.output == "image":
            from PIL import Image

            return GenerationOutput([Image.fromarray(a) for a in state["images"]], None, timings, seeds, ctx.warnings,
                                    ctx.sample_warnings)
        return GenerationOutput(None, list(state["videos"]), timings, seeds, ctx.warnings, ctx.sample_warnings)
