"""Input images as the pipelines take them: PIL images (or numpy arrays and torch tensors as diffusers takes them)
checked by mode and size, turned upright and to 8-bit RGB, and resized for the VAE."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .base import GenerationRequest, PipelineSpec

MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 64 << 20  # decoded pixels of an input image read from a file (a decompression bomb stops here)
# Input image files diffc opens (``diffc run --image``): formats Pillow decodes itself. Never EPS or PostScript,
# which Pillow hands to a Ghostscript process; the server takes PNG, JPEG and WebP only (diffc.serve.uploads).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "I;16", "I", "F", "1")

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # greyscale of more than 8 bits (16-bit PNG, TIFF)


def to_rgb(image):
    """An input image as 8-bit RGB. Greyscale of 16 bits (or 32-bit integers holding 16-bit values) is scaled down
    by 257 and float greyscale in [0, 1] by 255, since PIL's ``convert("RGB")`` would clip every value above 255
    (a 16-bit image turned almost white, a float one black)."""
    from PIL import Image

    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            values = values * 255.0 if top <= 1.0 else values
        elif image.mode.startswith("I;16") or top > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def too_large(width: int, height: int) -> str | None:
    """Why an input image of this size read from a file is refused before decoding, or None: "too large (...)"."""
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        return f"too large (at most {MAX_IMAGE_SIDE} a side and {MAX_IMAGE_PIXELS} pixels)"
    return None


def declared_too_large(exc: Exception) -> str:
    """Pillow's ``DecompressionBombError`` (a header declaring more pixels than it opens) as the rest of the size
    refusal: "N pixels by its header, too large (...)"."""
    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else Image.MAX_IMAGE_PIXELS * 2
    return f"{pixels} pixels by its header, {too_large(pixels, 1)}"


def upright(image):
    """A photo read from a file as it is shown: its EXIF orientation applied (as ``diffusers.utils.load_image``)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def input_images(request: GenerationRequest) -> list:
    """``request.image`` as a list of RGB PIL images (empty when there is none)."""
    images = request.image if isinstance(request.image, (list, tuple)) else [request.image]
    return [to_rgb(im) for im in images if im is not None]


def resize_image(image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos: diffusers' VaeImageProcessor
    resize + preprocess, as editing and image-to-video pipelines feed an input image to the VAE."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def check_image_size(where: str, width: int, height: int) -> None:
    """An input image (PIL, array or tensor) is 1 to ``MAX_IMAGE_SIDE`` pixels a side."""
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise InvalidArgumentError(where, f"size {width}x{height} is out of range (1 to {MAX_IMAGE_SIDE} pixels a side)")


def image_from_array(array, where: str):
    """A numpy array or torch tensor as diffusers takes one -> a PIL image: numpy (H, W), (H, W, 1|3|4), torch
    (1|3, H, W) or (H, W); either with a leading batch of 1; uint8 values 0-255, or floats 0-1 (diffusers'
    convention for both). Other integer types, a range beyond 0-1, NaN or a batch of several are refused by name."""
    from PIL import Image

    is_tensor = isinstance(array, torch.Tensor)
    data = array.detach().to("cpu") if is_tensor else array
    if is_tensor and data.dtype == torch.bfloat16:
        data = data.float()
    data = data.numpy() if is_tensor else np.asarray(data)
    kind = "tensor" if is_tensor else "array"
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise InvalidArgumentError(where, f"{'a tensor' if is_tensor else 'an array'} of {data.shape[0]} images; "
                                              f"pass one image per {kind} (a list for several)")
        data = data[0]
    if is_tensor and data.ndim == 3:
        if data.shape[0] not in (1, 3):
            raise InvalidArgumentError(where, f"a tensor image is (channels, height, width) with 1 or 3 channels, "
                                              f"got shape {tuple(array.shape)}")
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[-1] in (3, 4))):
        raise InvalidArgumentError(where, f"an image {kind} is (height, width[, 1, 3 or 4 channels])"
                                          f"{' or (channels, height, width)' if is_tensor else ''}, got shape "
                                          f"{tuple(array.shape)}")
    check_image_size(where, data.shape[1], data.shape[0])  # before the float range is read: an empty one has none
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.floating):
            raise InvalidArgumentError(where, f"an image {kind} holds uint8 values (0-255) or floats (0-1), "
                                              f"got {data.dtype}")
        if not np.isfinite(data).all():
            raise InvalidArgumentError(where, f"a float image {kind} holds values from 0 to 1, got NaN or inf")
        if data.min() < 0.0 or data.max() > 1.0:
            raise InvalidArgumentError(where, f"a float image {kind} holds values from 0 to 1, got "
                                              f"{data.min():.3g} to {data.max():.3g}")
        data = np.round(data.astype(np.float32) * 255.0).astype(np.uint8)
    mode = "L" if data.ndim == 2 else ("RGB" if data.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(data), mode=mode)


def validate_image(spec: PipelineSpec, request: GenerationRequest) -> None:
    """``image`` is allowed by the family, a PIL image (or a numpy array or torch tensor as diffusers takes one:
    :func:`image_from_array`) or a list of them, of a usable mode and size."""
    image = request.image
    if image is None or (isinstance(image, (list, tuple)) and not image):
        if spec.image_input == "required":
            raise InvalidArgumentError("image", f"{spec.pipeline_class} needs an input image (image=PIL image in "
                                       "Python, --image FILE on the command line)")
        request.image = None
        return
    if spec.image_input == "none":
        raise InvalidArgumentError("image", f"{spec.pipeline_class} does not take an input image "
                                   f"(it is a text-to-{spec.output} model)")
    from PIL import Image

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(images) > spec.max_images:
        raise InvalidArgumentError("image", f"{spec.pipeline_class} takes at most {spec.max_images} input "
                                   f"image(s), got {len(images)}")
    converted = False
    for i, im in enumerate(images):
        where = "image" if len(images) == 1 else f"image[{i}]"
        if isinstance(im, (np.ndarray, torch.Tensor)):
            images[i] = im = image_from_array(im, where)
            converted = True
        if not isinstance(im, Image.Image):
            raise InvalidArgumentError(where, f"must be a PIL image, a numpy array or a torch tensor, got "
                                              f"{type(im).__name__}")
        if im.mode not in IMAGE_MODES:
            raise InvalidArgumentError(where, f"mode {im.mode!r} cannot be converted to RGB; "
                                       f"accepted: {', '.join(IMAGE_MODES)}")
        check_image_size(where, *im.size)
        try:
            im.load()  # a lazily opened file is read now; one closed since cannot be
        except (ValueError, OSError, SyntaxError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InvalidArgumentError(where, f"cannot be read ({reason}); pass an image that is open and "
                                              "loaded") from None
    if converted:
        request.image = images if isinstance(image, (list, tuple)) else images[0]
