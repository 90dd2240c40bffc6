"""HTTP routes: ``/health``, ``/metrics`` and the OpenAI-compatible ``/v1`` API. The engine does the work."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidArgumentError
from .engine import Engine, Job, JobError, NotReady, QueueFull, WrongOutputKind
from .protocol import APIError, ImageRequest, VideoRequest, invalid, parse_body, read_payload
from .storage import new_id
from .uploads import Upload, decode_image, reference_bytes

ID_RE = re.compile(r"^(img|video)_[0-9a-f]{32}$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PARAM_OF_FIELD = {"height": "size", "width": "size"}  # pipeline fields -> request parameters
# a video's input frames: the pipeline's ``image`` (one) or ``image[0]``, ``image[1]`` (a first and a last frame)
VIDEO_PARAMS = {"image": "input_reference", "image[0]": "input_reference", "image[1]": "last_frame"}

public = APIRouter()


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


async def require_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@public.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = engine_of(request)
    body: dict[str, Any] = {"status": "ok" if engine.state == "ready" else engine.state, "model": engine.model_id,
                            "queue_depth": engine.queue_depth, "replicas": engine.replicas}
    if engine.parallel is not None:
        body["parallel"] = engine.parallel
    if engine.state != "ready":
        body["message"] = engine.not_ready_message()
    return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)


@public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(engine_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_object(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "diffc",
            "output": engine.output}


@v1.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(engine_of(request))]}


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    if model_id != engine.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{engine.model_id}'.",
                       param="model", code="model_not_found")
    return _model_object(engine)


def _prepare(engine: Engine, kind: str, req, params: dict[str, str] | None = None, uploads=None, **extra) -> Job:
    """Queue ``req``; an invalid field is a 400 naming the request's parameter (``params`` renames pipeline
    fields for this route, over ``PARAM_OF_FIELD``). ``uploads``: the files of the decoded ``image`` in
    ``extra``, which the job keeps instead of their pixels (its batch decodes them again)."""
    params = {**PARAM_OF_FIELD, **(params or {})}
    if req.model is not None and req.model != engine.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{engine.model_id}'.",
                       param="model", code="model_not_found")
    with _engine_errors(params):
        job = engine.prepare(kind, req.prompt, size=req.size_hw(), seed=req.seed, guidance_scale=req.guidance_scale,
                             num_inference_steps=req.num_inference_steps, negative_prompt=req.negative_prompt,
                             cache=req.cache, lora=req.lora, lora_strength=req.lora_strength,
                             true_cfg_scale=req.true_cfg_scale, **extra)
        _check_encodable(req, job)
        _check_kept(engine, req, job)
        if uploads is not None:
            job.options["image"] = uploads
        return engine.submit(job)


@contextlib.contextmanager
def _engine_errors(params: dict[str, str] = PARAM_OF_FIELD):
    """The engine's refusals as API errors: 503 not ready, 429 queue full, 400 naming the request's parameter."""
    try:
        yield
    except NotReady as exc:
        raise APIError(503, str(exc), type="server_error", code="model_not_ready",
                       headers={"Retry-After": "5"}) from None
    except QueueFull as exc:
        raise APIError(429, f"The server is busy: {exc}.", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except WrongOutputKind as exc:
        raise invalid("model", str(exc), code="model_not_supported") from None
    except InvalidArgumentError as exc:
        raise invalid(params.get(exc.field, exc.field), str(exc)) from None


def check_room(engine: Engine) -> None:
    """A request with uploads is refused (503, 429) before they are decoded when the engine could not queue it."""
    with _engine_errors():
        engine.check_room()


def _well_formed_range(value: str) -> bool:
    """``value`` is a byte-range header Starlette can answer: ``bytes=`` and ranges ``a-b`` (a <= b), ``a-`` or ``-n``."""
    unit, _, specs = value.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip():
        return False
    for part in specs.split(","):
        start, dash, end = part.strip().partition("-")
        if not dash or not (start or end) or not all(x.isdigit() for x in (start, end) if x):
            return False
        if start and end and int(start) > int(end):
            return False
    return True


class StoredFile(FileResponse):
    """A stored output. A malformed ``Range`` header is ignored and the whole file sent (RFC 9110 lets a server do
    so), instead of Starlette's plain-text 400; a well-formed one gets its partial content, or a 416 in the
    server's JSON error format (with ``Content-Range: bytes */SIZE``). A file that retention or a
    DELETE removed after the route found it is ``gone`` (a 404), not a 500 naming the server's path."""

    def __init__(self, path: Path, *, gone: APIError, **kwargs):
        super().__init__(path, **kwargs)
        self.gone = gone

    async def __call__(self, scope, receive, send) -> None:
        headers = scope.get("headers") or []
        ranges = [v for k, v in headers if k.lower() == b"range"]
        if ranges and not _well_formed_range(ranges[0].decode("latin-1")):
            scope = {**scope, "headers": [(k, v) for k, v in headers if k.lower() != b"range"]}
        try:
            stat_result = await anyio.to_thread.run_sync(os.stat, self.path)
        except FileNotFoundError:
            return await _error_json(self.gone)(scope, receive, send)
        self.stat_result = stat_result
        self.set_stat_headers(stat_result)
        await super().__call__(scope, receive, _json_416(send, stat_result.st_size))


def _error_json(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _json_416(send, size: int):
    """``send`` with Starlette's empty plain-text 416 replaced by the server's JSON error (and its
    ``Content-Range: bytes */SIZE``)."""
    replaced = False

    async def wrapped(message):
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == 416:
            replaced = True
            err = APIError(416, f"The Range header asks for bytes past the end of this file, which holds {size} bytes; "
                                "ask for a range that starts before its end, or for the whole file without Range.",
                           code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})
            response = _error_json(err)
            await send({"type": "http.response.start", "status": 416, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
        elif not replaced:
            await send(message)

    return wrapped


WEBP_MAX_SIDE = 16383  # libwebp's limit on either side


def _check_encodable(req, job: Job) -> None:
    """An image request's output format can hold the size the job will generate (checked before it is queued, not
    after the generation)."""
    if getattr(req, "output_format", None) == "webp" and max(job.options["width"], job.options["height"]) > WEBP_MAX_SIDE:
        raise invalid("output_format", f"WebP images are at most {WEBP_MAX_SIDE} pixels a side and this one would be "
                                       f"{_size(job)}; ask for a smaller size or output_format png or jpeg")


def _check_kept(engine: Engine, req, job: Job) -> None:
    """``response_format: "url"`` asks for no more images than the server keeps (``--keep-outputs``): retention would
    delete the first ones before the answer names them."""
    n = len(job.seeds)
    if getattr(req, "response_format", None) == "url" and n > engine.store.keep:
        raise invalid("n", f"this server keeps {engine.store.keep} output(s) (--keep-outputs), so {n} images as URLs "
                           "would expire before the answer; ask for fewer or use response_format b64_json")


async def _until_done_or_gone(request: Request, job: Job) -> bool:
    """Wait for ``job``: True once it is done (its error, if any, is raised), False if the client disconnected
    first (the caller cancels the job: it leaves the queue, or its batch stops at the next step when no other
    request shares it)."""
    result = asyncio.ensure_future(asyncio.wrap_future(job.future))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
    if not result.done() or result.cancelled():
        return False
    result.result()
    return True


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already, so the next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _job_api_error(err: JobError) -> APIError:
    return APIError(err.status, err.message, type=err.type, param=err.param, code=err.code)


def _size(job: Job) -> str:
    return f"{job.options['width']}x{job.options['height']}"


def _stats(job: Job) -> dict[str, Any]:
    queued = (job.started_at or job.completed_at or time.time()) - job.created_at
    return {"inference_time_s": round(job.inference_time_s, 4),
            "peak_memory_mb": None if job.peak_memory_mb is None else round(job.peak_memory_mb, 1),
            "queue_time_s": round(queued, 4)}


@v1.post("/images/generations")
async def generate_images(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    req: ImageRequest = parse_body(ImageRequest, await read_payload(request))
    spec = engine.pipe.spec if engine.state == "ready" else None
    if spec is not None and spec.output == "image" and spec.image_input == "required":
        raise invalid("image", f"'{engine.model_id}' ({spec.pipeline_class}) edits input images; send them to "
                               "POST /v1/images/edits (multipart, the files under 'image')")
    job = _prepare(engine, "image", req, n=req.n)
    return await answer_images(request, engine, job, req)


async def answer_images(request: Request, engine: Engine, job: Job, req: ImageRequest) -> dict[str, Any]:
    """Wait for an image ``job`` (cancelled when the client goes away or the server stops) and answer with its
    images as OpenAI response items: ``b64_json``, or a ``url`` to ``/v1/images/{id}/content``. Generations and
    edits answer alike."""
    try:
        done = await _until_done_or_gone(request, job)
    except asyncio.CancelledError:  # the server is stopping
        engine.cancel(job)
        raise
    except JobError as err:
        raise _job_api_error(err) from None
    if not done:  # the client went away: nobody will read this answer
        engine.cancel(job)
        raise APIError(499, "The client closed the connection; the job was cancelled.", code="client_disconnected")
    fmt = req.output_format or "png"
    quality = req.output_compression if req.output_compression is not None else 95
    url = req.response_format == "url"
    base = str(request.base_url).rstrip("/")

    written: list[str] = []

    def encode() -> list[dict[str, Any]]:
        items = []
        kwargs = {} if fmt == "png" else {"quality": quality}
        for image, seed in zip(job.outputs, job.seeds, strict=True):
            item: dict[str, Any] = {"revised_prompt": None, "seed": seed}
            if url:
                image_id = new_id("img")
                path = engine.store.write(image_id, f".{fmt}",
                                          lambda p, im=image: im.save(p, format=fmt.upper(), **kwargs))
                engine.store.add(image_id, path)
                written.append(image_id)
                item["url"] = f"{base}/v1/images/{image_id}/content"
            else:
                buf = io.BytesIO()
                image.save(buf, format=fmt.upper(), **kwargs)
                item["b64_json"] = base64.b64encode(buf.getvalue()).decode("ascii")
            items.append(item)
        return items

    try:
        data = await run_in_threadpool(encode)
    except OSError as exc:  # a full disk: no partial file stays (atomic writes), nor this request's earlier images
        for item in written:
            engine.store.remove(item)
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise APIError(500, f"writing the image failed: {reason}", type="server_error",
                       code="output_write_failed") from None
    job.outputs = []
    return {"created": int(job.created_at), "data": data, "model": engine.model_id, "size": _size(job),
            "output_format": fmt, "num_inference_steps": job.options["num_inference_steps"],
            "warnings": job.warnings, **_stats(job)}


@v1.get("/images/{image_id}/content")
async def image_content(image_id: str, request: Request) -> FileResponse:
    path = engine_of(request).store.get(image_id) if ID_RE.match(image_id) else None
    gone = APIError(404, f"No image found with id '{image_id}' (it may have expired).", param="image_id",
                    code="not_found", type="invalid_request_error")
    if path is None or not image_id.startswith("img_"):
        raise gone
    return StoredFile(path, gone=gone, media_type=MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream"))


def _video_object(engine: Engine, job: Job) -> dict[str, Any]:
    frames = job.options.get("num_frames") or 1
    error = None if job.error is None else {"code": job.error.code, "message": job.error.message}
    return {"id": job.id, "object": "video", "model": engine.model_id, "status": job.status, "progress": job.progress,
            "created_at": int(job.created_at),
            "completed_at": None if job.completed_at is None else int(job.completed_at),
            "expires_at": engine.store.expires_at(job.id), "prompt": job.prompt, "remixed_from_video_id": None,
            "seconds": f"{(frames - 1) / job.fps:g}", "size": _size(job), "error": error, "seed": job.seeds[0],
            "num_frames": frames, "fps": job.fps, "num_inference_steps": job.options["num_inference_steps"],
            **_stats(job)}


def _find_video(engine: Engine, video_id: str) -> Job:
    job = engine.video(video_id) if ID_RE.match(video_id) else None
    if job is None:
        raise APIError(404, f"No video found with id '{video_id}'.", param="video_id", code="not_found")
    return job


VIDEO_FILES = ("input_reference", "last_frame")  # a video's input frames: the first, and the last (first-last-frame)


def _check_frames(engine: Engine, req: VideoRequest) -> None:
    """The request's input frames against the model, before they are decoded: ``input_reference`` (the first frame)
    where the model takes one, ``last_frame`` where the checkpoint reads one (Wan2.1 FLF2V needs it)."""
    from ..pipelines.base import last_frame_input

    if engine.state != "ready":  # refused (503) by check_room or engine.prepare
        return
    pipe = engine.pipe
    name = f"'{engine.model_id}' ({pipe.spec.pipeline_class})"
    for field in VIDEO_FILES:
        if getattr(req, field) is not None and pipe.spec.image_input == "none":
            raise invalid(field, f"{name} is a text-to-video model and takes no input image",
                          code="model_not_supported")
    mode, why = last_frame_input(pipe)
    if req.last_frame is not None and mode == "none":
        raise invalid("last_frame", f"'{engine.model_id}': {why}", code="model_not_supported")
    if req.input_reference is None and (pipe.spec.image_input == "required" or req.last_frame is not None):
        raise invalid("input_reference", f"{name} is an image-to-video model: send its first frame as input_reference "
                                         "(an uploaded image file or a base64 data URL)",
                      code="missing_required_parameter")
    if req.last_frame is None and mode == "required":
        raise invalid("last_frame", f"'{engine.model_id}': {why}: send the last frame as last_frame (an uploaded image "
                                    "file or a base64 data URL) beside input_reference",
                      code="missing_required_parameter")


@v1.post("/videos")
async def create_video(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    req: VideoRequest = parse_body(VideoRequest, await read_payload(request, files=VIDEO_FILES))
    _check_frames(engine, req)
    extra: dict[str, Any] = {}
    if req.input_reference is not None:
        check_room(engine)
        uploads = [Upload(reference_bytes(getattr(req, f), f), f) for f in VIDEO_FILES if getattr(req, f) is not None]
        images = await anyio.to_thread.run_sync(lambda: [decode_image(u.data, u.field) for u in uploads],
                                                limiter=request.app.state.decodes)
        extra = {"image": images[0], "uploads": uploads[0]} if len(images) == 1 else \
            {"image": images, "uploads": uploads}
    job = _prepare(engine, "video", req, params=VIDEO_PARAMS, num_frames=req.num_frames, seconds=req.seconds,
                   fps=req.fps, **extra)
    return _video_object(engine, job)


@v1.get("/videos")
async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    engine = engine_of(request)
    jobs = engine.videos()
    if order == "desc":
        jobs.reverse()
    if after is not None:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    page = jobs[:limit]
    return {"object": "list", "data": [_video_object(engine, j) for j in page], "has_more": len(jobs) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@v1.get("/videos/{video_id}")
async def get_video(video_id: str, request: Request) -> JSONResponse:
    engine = engine_of(request)
    job = _find_video(engine, video_id)
    headers = {"openai-poll-after-ms": "500"} if job.status in ("queued", "in_progress") else None
    return JSONResponse(_video_object(engine, job), headers=headers)


@v1.get("/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, variant: str = "video") -> FileResponse:
    engine = engine_of(request)
    job = _find_video(engine, video_id)
    if variant != "video":
        raise invalid("variant", f"variant '{variant}' is not available; diffc serves only 'video'")
    if job.status == "failed":  # it never will have content: say why, not that it is not ready yet
        reason = job.error.message if job.error is not None else "unknown error"
        raise APIError(409, f"Video '{video_id}' has no content: it failed ({reason}).", param="video_id",
                       code="video_failed")
    path = engine.store.get(job.id) if job.status == "completed" else None
    if path is None:
        detail = f"it has status '{job.status}'" if job.status != "completed" else "its file has expired"
        raise APIError(409 if job.status != "completed" else 404, f"Video '{video_id}' has no content: {detail}.",
                       param="video_id", code="video_not_ready" if job.status != "completed" else "not_found")
    gone = APIError(404, f"Video '{video_id}' has no content: its file has expired.", param="video_id",
                    code="not_found")
    return StoredFile(path, gone=gone, media_type="video/mp4", filename=f"{job.id}.mp4")


@v1.delete("/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    job = _find_video(engine, video_id)
    engine.cancel(job)
    return {"id": job.id, "object": "video.deleted", "deleted": True}
