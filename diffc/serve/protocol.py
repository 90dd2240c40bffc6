"""The wire format: request models and request-body parsing (JSON or form data); errors are :mod:`.api_error`'s.

Request models accept the OpenAI fields (those diffc cannot honour are refused by name, the rest are
accepted and ignored) plus diffc's own generation fields. Any other field is an error naming it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .api_error import APIError, invalid
from .hardening import check_values, duplicated, load_json

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


NUMBER_FIELDS = ("n", "num_inference_steps", "guidance_scale", "true_cfg_scale", "seed", "num_frames", "fps", "seconds",
                 "output_compression")


MAX_CACHE_OPTIONS = 16


def check_cache_field(value: Any) -> Any:
    """The shape of a request's ``cache``: None, a kind name, or an object of at most 16 options (their
    values are checked against the model by the engine, ``Pipeline.check_cache``)."""
    if value is None or (isinstance(value, str) and len(value) <= 64):
        return value
    if isinstance(value, dict) and len(value) <= MAX_CACHE_OPTIONS and all(isinstance(k, str) for k in value):
        return value
    raise ValueError("must be a step cache (dbcache, fbcache, teacache or none) or an object with its 'kind' and "
                     f"options (at most {MAX_CACHE_OPTIONS})")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    HINTS: ClassVar[dict[str, str]] = {}  # an unknown field a client may mean as another: where it belongs

    prompt: str
    model: str | None = None
    size: str | None = None
    # diffc generation fields
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None  # true CFG with negative_prompt (FLUX.1-dev, Kontext)
    seed: int | None = None
    cache: Any = None  # step cache: a kind, "none", or {"kind": ..., options}; checked by check_cache_field
    lora: Any = None  # nickname(s) of cached LoRA adapters for this request ([] = the base model)
    lora_strength: Any = None
    # accepted for compatibility and ignored
    user: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in NUMBER_FIELDS:
                if isinstance(data.get(name), bool):
                    raise APIError(400, f"Invalid value for '{name}': expected a number, got {data[name]}.",
                                   param=name, code="invalid_value")
        return data

    @field_validator("cache")
    @classmethod
    def _cache_shape(cls, v: Any) -> Any:
        return check_cache_field(v)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    def size_hw(self) -> tuple[int, int] | None:
        """``(height, width)`` from ``size`` ("WIDTHxHEIGHT"), or ``None`` for the server's default."""
        if self.size is None or self.size == "auto":
            return None
        m = SIZE_RE.match(self.size)
        if not m:
            raise invalid("size", f"size must look like '1024x1024' (width x height) or 'auto', got {self.size!r}")
        width, height = int(m.group(1)), int(m.group(2))
        if width < 1 or height < 1:
            raise invalid("size", f"size must be positive, got {self.size!r}")
        return height, width


EDIT_HINT = "input images go to POST /v1/images/edits (multipart/form-data, the files under 'image')"


class ImageRequest(_Request):
    """``POST /v1/images/generations``."""

    HINTS: ClassVar[dict[str, str]] = {"image": EDIT_HINT, "images": EDIT_HINT, "mask": EDIT_HINT}

    n: int = 1  # null (JSON) or an empty form value: 1, as every other optional field takes its default
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # OpenAI's values for these (accepted and ignored: a typo is refused naming them, as OpenAI refuses it)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    complexity: Any = None
    frame_count: Any = None
    frame_duration_ms: Any = None
    svg: Any = None

    @field_validator("n", mode="before")
    @classmethod
    def _n_default(cls, value: Any) -> Any:
        return 1 if value is None else value

    def check_supported(self) -> None:
        if self.output_format in ("gif", "svg"):
            raise invalid("output_format",
                          f"output_format '{self.output_format}' is not supported; use png, jpeg or webp")
        if self.output_compression is not None and not 0 <= self.output_compression <= 100:
            raise invalid("output_compression", "output_compression must be from 0 to 100")
        if self.background == "transparent":
            raise invalid("background", "transparent backgrounds are not supported; use 'opaque' or 'auto'")
        if self.stream:
            raise invalid("stream", "streaming is not supported; leave stream unset or false")
        if self.partial_images:
            raise invalid("partial_images", "partial images are not supported")
        for name in ("complexity", "frame_count", "frame_duration_ms", "svg"):
            if getattr(self, name) is not None:
                raise invalid(name, f"'{name}' is not supported by diffc", code="unsupported_parameter")


class VideoRequest(_Request):
    """``POST /v1/videos`` (JSON or form data, as the ``openai`` client sends it)."""

    HINTS: ClassVar[dict[str, str]] = {
        **{name: "an image-to-video model's first frame is 'input_reference' (an uploaded file or a base64 data URL)"
           for name in ("image", "image_url", "first_frame")},
        **{name: "a first-last-frame model's last frame is 'last_frame' (an uploaded file or a base64 data URL)"
           for name in ("last_image", "end_image", "last_frame_image")}}

    seconds: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    input_reference: Any = None  # the first frame (image-to-video)
    last_frame: Any = None  # the last frame (first-last-frame checkpoints: Wan2.1 FLF2V, Wan2.2 I2V-A14B)

    def check_supported(self) -> None:
        if self.seconds is not None and self.num_frames is not None:
            raise invalid("seconds", "give seconds or num_frames, not both (num_frames = 4k+1 frames; seconds are "
                                     "converted to the nearest valid count at the request's fps)")
        if self.seconds is not None and not 0 < self.seconds <= 600:
            raise invalid("seconds", f"seconds must be greater than 0 and at most 600, got {self.seconds:g}")
        if self.fps is not None and not 1 <= self.fps <= 240:
            raise invalid("fps", f"fps must be from 1 to 240, got {self.fps}")


def _first_error(exc: ValidationError, hints: dict[str, str] | None = None) -> APIError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    if err.get("type") == "extra_forbidden":
        hint = (hints or {}).get(param or "")
        return APIError(400, f"Unrecognized request argument supplied: {param}" + (f"; {hint}" if hint else ""),
                        param=param, code="unknown_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return invalid(param, f"Invalid value for '{param}': {msg}.")


async def read_payload(request, files: tuple[str, ...] = ()) -> Any:
    """The request's fields: multipart form data through Starlette (python-multipart), anything else as JSON.

    Any body that is not multipart is read as JSON, whatever its content type (``curl -d`` sends
    ``application/x-www-form-urlencoded``). File uploads under a name in ``files`` are read as
    ``{"filename": ..., "data": bytes}``; any other upload is kept as ``{"filename": ...}`` so the
    request model can refuse it by name. A field given twice is refused by name.
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart: python-multipart raises its own errors
            raise invalid(None, f"could not parse the multipart/form-data body ({exc})", code="invalid_body") from None
        fields: dict[str, Any] = {}
        try:
            for name, value in form.multi_items():
                if name in fields:
                    raise duplicated(name)
                if isinstance(value, str):
                    fields[name] = None if value == "" and name != "prompt" else value
                elif name in files:
                    fields[name] = {"filename": value.filename, "data": await value.read()}
                else:
                    fields[name] = {"filename": value.filename}
        finally:
            await form.close()
        check_values(fields)
        return fields
    try:
        return load_json(await request.body())
    except APIError as exc:
        if exc.code == "invalid_json" and content_type.startswith("application/x-www-form-urlencoded"):
            raise APIError(400, f"{exc.message} Send the fields as a JSON object (Content-Type: application/json) or "
                                "as multipart/form-data; a form-urlencoded body (name=value&...) is read as JSON.",
                           code="invalid_json") from None
        raise


def parse_body(model: type[_Request], data: Any) -> _Request:
    """Validate a request's fields (from ``read_payload``) into ``model``; every failure is a 400 in OpenAI's format."""
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, model.HINTS) from None
    request.check_supported()
    return request
