"""Input images sent to the server: uploaded files and base64 data URLs, decoded once, fully, and bounded.

Used by ``POST /v1/images/edits`` (the ``image`` files) and ``POST /v1/videos`` (``input_reference``, the
first frame of an image-to-video model, and ``last_frame``, the last of a first-last-frame one). Every problem
is a 400 naming the field: an empty or oversized file, a file that is not a PNG, JPEG or WebP image, an image
too large or of a mode that cannot become RGB. Only those three formats are opened: Pillow hands other formats
to other code (EPS and PostScript to a Ghostscript process). The server never fetches a URL and knows no file ids.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
from typing import Any

from ..pipelines.images import IMAGE_MODES, declared_too_large, too_large, upright
from .protocol import invalid

MAX_IMAGE_BYTES = 50 << 20  # per file, as OpenAI's limit for edits
# uploads decoded at once by a server's requests: a small file may decode to 64 Mpx (a few hundred MB while it
# decodes), so a burst of them must not all decode together (create_app's limiter)
DECODE_SLOTS = 2
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may identify an upload as; anything else is refused
# RFC 2397: a media type, optional parameters (";name=first.png"), then ";base64,"
DATA_URL_RE = re.compile(r"^data:image/[a-z0-9.+-]+(?:;[a-z0-9.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
WHITESPACE_RE = re.compile(r"[ \t\r\n]+")


@dataclasses.dataclass(frozen=True)
class Upload:
    """An uploaded image as its file's bytes, which a job holds while it waits and after it ran (a 200 KB PNG can
    decode to 200 MB of pixels); :func:`decoded` decodes it again, to the same pixels, when its batch runs.
    Equal bytes are equal uploads (jobs with the same image may share a batch)."""

    data: bytes
    field: str = dataclasses.field(compare=False)

    def __repr__(self) -> str:
        return f"Upload({self.field}, {len(self.data)} bytes)"


def decoded(image: Any) -> Any:
    """``image`` (a job's input image option) with every :class:`Upload` in it decoded."""
    if isinstance(image, Upload):
        return decode_image(image.data, image.field)
    if isinstance(image, (list, tuple)):
        return [decoded(im) for im in image]
    return image


def decode_image(data: bytes, field: str):
    """An uploaded file as a fully decoded PIL image; anything else is a 400 naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise invalid(field, f"'{field}' is an empty file; upload a PNG, JPEG or WebP image")
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(field, f"'{field}' is {len(data)} bytes; at most {MAX_IMAGE_BYTES >> 20} MiB per image")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            w, h = im.size
            if too_large(w, h):
                raise invalid(field, f"'{field}' is {w}x{h} pixels, {too_large(w, h)}")
            if im.mode not in IMAGE_MODES:
                raise invalid(field, f"'{field}' has image mode {im.mode!r}, which cannot be converted to RGB; "
                                     f"accepted modes: {', '.join(IMAGE_MODES)}")
            im.load()
            return upright(im.copy())
    except UnidentifiedImageError:  # its message names the server's buffer object, nothing the client sent
        raise invalid(field, f"'{field}' is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError as exc:  # a header declaring billions of pixels, refused by Pillow's open
        raise invalid(field, f"'{field}' is {declared_too_large(exc)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise invalid(field, f"'{field}' is not a readable image ({reason}); upload a PNG, JPEG or WebP") from None


def reference_image(value: Any, field: str = "input_reference"):
    """``input_reference`` as a PIL image: an uploaded file (multipart, ``{"filename", "data"}``), a base64 data
    URL (``data:image/png;base64,...``), or ``{"image_url": <data URL>}``."""
    return decode_image(reference_bytes(value, field), field)


def reference_bytes(value: Any, field: str = "input_reference") -> bytes:
    """The image file ``input_reference`` holds (see :func:`reference_image`), not yet decoded."""
    if isinstance(value, dict) and isinstance(value.get("data"), bytes):
        return value["data"]
    if isinstance(value, dict) and set(value) <= {"image_url", "file_id"} and isinstance(value.get("image_url"), str):
        value = value["image_url"]
    if not isinstance(value, str):
        raise invalid(field, f"'{field}' must be an uploaded image file or a base64 data URL "
                             "(data:image/png;base64,...)")
    text = value.strip()
    match = DATA_URL_RE.match(text)
    if match is None:
        what = "a URL" if text.lower().startswith(("http://", "https://")) else "not a data URL"
        raise invalid(field, f"'{field}' is {what}; the server fetches nothing: upload the image file "
                             "(multipart) or send it as a base64 data URL (data:image/png;base64,...)")
    payload = WHITESPACE_RE.sub("", text[match.end():])  # base64 wrapped in lines, as the base64 command writes it
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise invalid(field, f"'{field}' is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"'{field}' is not valid base64 after its data: prefix") from None
