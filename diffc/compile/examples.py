"""The example requests a compile runs a pipeline on: a bucket (size, frames, batch, ``prompt_length``,
``image_size``) made into generation arguments, with example prompts of a padded text length and grey example
images where the DiT's shapes depend on them (:mod:`.pipeline` captures the DiT's inputs from these)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgumentError
from . import prompt_lengths

EXAMPLE_PROMPT = "a compile-time example prompt"


def expand_prompt_lengths(pipe, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``requests`` with each ``prompt_lengths`` ("all", or a list of padded text lengths) made into one request
    per length (``prompt_length``), for models whose DiT holds the prompt at its own padded length (Z-Image,
    Qwen-Image); other models serve every prompt with one shape, and keep one request."""
    out = []
    for request in requests:
        if "prompt_lengths" not in request:
            out.append(request)
            continue
        wanted = request["prompt_lengths"]
        rest = {k: v for k, v in request.items() if k != "prompt_lengths"}
        if not prompt_lengths.counts_prompts(pipe):
            if getattr(pipe.spec, "prompt_shapes", False):
                raise InvalidArgumentError("prompt_lengths", f"{pipe.spec.pipeline_class}'s text length follows its "
                                           "input images too: give example prompts of the lengths to compile")
            out.append(rest)  # one DiT shape serves every prompt
            continue
        possible = prompt_lengths.lengths(pipe, _max_sequence_length(pipe, request))
        if wanted == "all":
            lengths = possible
        elif isinstance(wanted, (list, tuple)) and wanted and all(n in possible for n in wanted):
            lengths = list(dict.fromkeys(wanted))
        else:
            raise InvalidArgumentError("prompt_lengths", f'expected "all" or a list of text lengths from '
                                       f'{", ".join(map(str, possible))}, got {wanted!r}')
        out += [{**rest, "prompt_length": n} for n in lengths]
    return out


def _max_sequence_length(pipe, request: dict[str, Any]) -> int:
    """The request's ``max_sequence_length`` (else the family's default), validated with the rest of it."""
    fields = {k: v for k, v in example_images(request).items() if k not in ("prompt_length", "prompt_lengths")}
    return pipe.resolve(**{"prompt": EXAMPLE_PROMPT, **fields}).max_sequence_length


def example_request(pipe, request: dict[str, Any]) -> dict[str, Any]:
    """A bucket as generation arguments: its ``image_size`` as example images, its ``prompt_length`` as example
    prompts of that padded text length, and for a model that needs an input image (editing, image-to-video)
    without ``image_size``, a grey one at the bucket's own size (:func:`with_example_images`)."""
    request = example_images(request)
    if "prompt_length" in request:
        request = dict(request)
        length = request.pop("prompt_length")
        if not prompt_lengths.counts_prompts(pipe):
            raise InvalidArgumentError("prompt_length", f"{pipe.spec.pipeline_class} does not count its prompts' "
                                       "text tokens; give an example prompt instead")
        if isinstance(length, bool) or not isinstance(length, int):
            raise InvalidArgumentError("prompt_length", f"expected an integer text length, got {length!r}")
        text = prompt_lengths.example_prompt(pipe, length, _max_sequence_length(pipe, request))
        batch = request.get("prompt")
        request["prompt"] = [text] * (len(batch) if isinstance(batch, list) and batch else 1)
    return with_example_images(pipe, request)


def with_example_images(pipe, request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with the input images the model needs to reach its DiT: a grey one at the bucket's size where it
    needs an image and has none (editing, image-to-video), and where the checkpoint needs a first and a last frame
    (Wan2.1 FLF2V, whose DiT reads both frames' image tokens) the one image as both: their sizes do not change the
    DiT's shapes (each frame is resized to the video's size)."""
    if getattr(pipe.spec, "image_input", "none") == "required" and request.get("image") is None:
        request = {**request, "image": example_image(request)}
    image, last_frame = request.get("image"), getattr(pipe.spec, "last_frame", None)  # PipelineSpec.last_frame
    if image is not None and not isinstance(image, (list, tuple)) and last_frame and last_frame(pipe)[0] == "required":
        request = {**request, "image": [image, image]}
    return request


def example_images(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with its ``image_size`` ("WxH", or a list for several input images) turned into flat gray
    example images: an editing model's DiT shapes depend on its input images' sizes, not their pixels, and
    the bucket stays JSON (the artifact's manifest records ``image_size``)."""
    if "image_size" not in request:
        return request
    from PIL import Image

    sizes = request["image_size"]
    images = []
    for text in sizes if isinstance(sizes, (list, tuple)) else [sizes]:
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and 0 < int(p) <= 16384 for p in parts):
            raise InvalidArgumentError("image_size", f"expected WIDTHxHEIGHT (e.g. 1024x768), got {text!r}")
        images.append(Image.new("RGB", (int(parts[0]), int(parts[1])), (127, 127, 127)))
    out = {k: v for k, v in request.items() if k != "image_size"}
    out["image"] = images[0] if len(images) == 1 else images
    return out


def example_image(request: dict[str, Any]):
    """A grey input image at the bucket's size (editing models need one to reach the DiT): the compiled shapes
    then serve input images of that aspect ratio."""
    from PIL import Image

    return Image.new("RGB", (int(request.get("width") or 1024), int(request.get("height") or 1024)), (128, 128, 128))


__all__ = ["EXAMPLE_PROMPT", "example_image", "example_images", "example_request", "expand_prompt_lengths",
           "with_example_images"]
