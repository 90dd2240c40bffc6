"""``POST /v1/images/edits``: image editing in OpenAI's multipart format, on the generations job queue.

The body is ``multipart/form-data`` as ``openai.OpenAI().images.edit(...)`` sends it: one or more files
under ``image`` (or ``image[]``), ``prompt``, and the optional ``n``, ``size``, ``response_format``,
``output_format``, ``model`` ... plus diffc's generation fields (``seed``, ``num_inference_steps``,
``guidance_scale``, ``true_cfg_scale``, ``negative_prompt``). Without ``size`` the output follows the
input image (as the model sizes it). An upload that is not an image, is too large, or has a mode
the model cannot use is a 400 naming the field; so is a model that takes no input image.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .engine import JobError
from .protocol import APIError, ImageRequest, invalid, parse_body
from .routes import _job_api_error, _prepare, _size, _stats, _until_done_or_gone, engine_of, require_api_key
from .storage import new_id
from .uploads import decode_image

MAX_FILES = 16

edit_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class EditRequest(ImageRequest):
    """The fields of ``POST /v1/images/edits`` besides the image files."""

    mask: Any = None
    input_fidelity: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.mask is not None:
            raise invalid("mask", "masks (inpainting) are not supported; the edit applies to the whole image",
                          code="unsupported_parameter")


async def read_edit_form(request: Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The form's text fields and its image files as ``(field name, bytes)`` in order."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid(None, "POST /v1/images/edits takes multipart/form-data (the image files, prompt, ...)",
                      code="invalid_body")
    try:
        form = await request.form(max_files=MAX_FILES + 1)
    except Exception as exc:  # malformed multipart: python-multipart raises its own errors
        raise invalid(None, f"could not parse the multipart/form-data body ({exc})", code="invalid_body") from None
    fields: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "image[]"):
                    fields[name] = {"filename": value.filename}  # a file where a value belongs: refused by name
                    continue
                files.append((name, await value.read()))
            elif name in ("image", "image[]"):
                raise invalid(name, f"'{name}' must be an uploaded image file, got a text value")
            else:
                fields[name] = None if value == "" and name != "prompt" else value
    finally:
        await form.close()
    return fields, files


@edit_router.post("/images/edits")
async def edit_images(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    fields, files = await read_edit_form(request)
    req: EditRequest = parse_body(EditRequest, fields)
    if not files:
        raise invalid("image", "Missing required parameter: 'image' (one or more image files)",
                      code="missing_required_parameter")
    if len(files) > MAX_FILES:
        raise invalid("image", f"at most {MAX_FILES} images per request, got {len(files)}")
    if engine.state == "ready" and engine.pipe.spec.image_input == "none":
        raise invalid("image", f"'{engine.model_id}' ({engine.pipe.spec.pipeline_class}) is a text-to-"
                               f"{engine.pipe.spec.output} model and takes no input image; use "
                               "POST /v1/images/generations", code="model_not_supported")
    names = [name if len(files) == 1 else f"image[{i}]" for i, (name, _) in enumerate(files)]
    images = await run_in_threadpool(lambda: [decode_image(data, n) for n, (_, data) in zip(names, files)])
    job = _prepare(engine, "image", req, n=req.n, image=images[0] if len(images) == 1 else images)
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
    data = await run_in_threadpool(encode_images, engine, job, fmt, quality, req.response_format == "url",
                                   str(request.base_url).rstrip("/"))
    job.outputs = []
    return {"created": int(job.created_at), "data": data, "model": engine.model_id, "size": _size(job),
            "output_format": fmt, "num_inference_steps": job.options["num_inference_steps"],
            "warnings": job.warnings, **_stats(job)}


def encode_images(engine, job, fmt: str, quality: int, url: bool, base: str) -> list[dict[str, Any]]:
    """The job's images as OpenAI response items: ``b64_json``, or a ``url`` to ``/v1/images/{id}/content``."""
    items = []
    kwargs = {} if fmt == "png" else {"quality": quality}
    for image, seed in zip(job.outputs, job.seeds, strict=True):
        item: dict[str, Any] = {"revised_prompt": None, "seed": seed}
        if url:
            image_id = new_id("img")
            path = engine.store.write(image_id, f".{fmt}", lambda p, im=image: im.save(p, format=fmt.upper(), **kwargs))
            engine.store.add(image_id, path)
            item["url"] = f"{base}/v1/images/{image_id}/content"
        else:
            buf = io.BytesIO()
            image.save(buf, format=fmt.upper(), **kwargs)
            item["b64_json"] = base64.b64encode(buf.getvalue()).decode("ascii")
        items.append(item)
    return items
