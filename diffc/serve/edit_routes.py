"""``POST /v1/images/edits``: image editing in OpenAI's multipart format, on the generations job queue.

The body is ``multipart/form-data`` as ``openai.OpenAI().images.edit(...)`` sends it: one or more files
under ``image`` (or ``image[]``), ``prompt``, and the optional ``n``, ``size``, ``response_format``,
``output_format``, ``model`` ... plus diffc's generation fields (``seed``, ``num_inference_steps``,
``guidance_scale``, ``true_cfg_scale``, ``negative_prompt``). Without ``size`` the output follows the
input image (as the model sizes it). An upload that is not an image, is too large, or has a mode
the model cannot use is a 400 naming the field; so is a model that takes no input image.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from .hardening import check_values, duplicated
from .protocol import ImageRequest, invalid, parse_body
from .routes import _prepare, answer_images, check_room, engine_of, require_api_key
from .uploads import Upload, decode_image

MAX_FILES = 16

edit_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class EditRequest(ImageRequest):
    """The fields of ``POST /v1/images/edits`` besides the image files."""

    mask: Any = None
    input_fidelity: Literal["low", "high"] | None = None  # accepted and ignored

    def check_supported(self) -> None:
        super().check_supported()
        if self.mask is not None:
            raise invalid("mask", "masks (inpainting) are not supported; the edit applies to the whole image",
                          code="unsupported_parameter")


async def read_edit_form(request: Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The form's text fields and its image files as ``(field name, bytes)`` in order; a field other than the
    images given twice is refused by name."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid(None, "POST /v1/images/edits takes multipart/form-data (the image files, prompt, ...)",
                      code="invalid_body")
    try:
        form = await request.form(max_files=MAX_FILES + 1)
    except Exception as exc:  # malformed multipart: python-multipart raises its own errors
        if "too many files" in str(exc).lower():  # the parser stops at MAX_FILES + 1: more than the route takes
            raise invalid("image", f"at most {MAX_FILES} images per request") from None
        raise invalid(None, f"could not parse the multipart/form-data body ({exc})", code="invalid_body") from None
    fields: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    try:
        for name, value in form.multi_items():
            if name in fields:
                raise duplicated(name)
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
    check_values(fields)  # a charset such as utf-7 can decode to lone surrogates, in values and in field names
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
    if engine.state == "ready":  # what the model takes, checked before any file is decoded
        spec = engine.pipe.spec
        if spec.image_input == "none":
            route = "POST /v1/images/generations" if spec.output == "image" else "POST /v1/videos"
            raise invalid("image", f"'{engine.model_id}' ({spec.pipeline_class}) is a text-to-{spec.output} model "
                                   f"and takes no input image; use {route}", code="model_not_supported")
        if len(files) > spec.max_images:
            raise invalid("image", f"{spec.pipeline_class} takes at most {spec.max_images} input image(s), "
                                   f"got {len(files)}")
    check_room(engine)  # a busy server refuses before decoding (a burst would wait on the decodes for its 429s)
    uploads = [Upload(data, name if len(files) == 1 else f"image[{i}]") for i, (name, data) in enumerate(files)]
    images = await anyio.to_thread.run_sync(lambda: [decode_image(u.data, u.field) for u in uploads],
                                            limiter=request.app.state.decodes)
    job = _prepare(engine, "image", req, n=req.n, image=images[0] if len(images) == 1 else images,
                   uploads=uploads[0] if len(uploads) == 1 else uploads)
    return await answer_images(request, engine, job, req)
