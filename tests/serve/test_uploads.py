"""Uploaded images are decoded as PNG, JPEG or WebP only: no other Pillow plugin (EPS would start Ghostscript)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from diffc.serve.api_error import APIError
from diffc.serve.uploads import UPLOAD_FORMATS, decode_image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _encoded(fmt: str, mode: str = "RGB", size=(9, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (128, 128, 128)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", UPLOAD_FORMATS)
def test_png_jpeg_and_webp_decode(fmt):
    im = decode_image(_encoded(fmt), "image")
    assert im.size == (9, 7) and abs(im.convert("L").getpixel((4, 3)) - 128) <= 2


def test_postscript_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or Image.new("RGB", (1, 1)))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(APIError) as info:
        decode_image(EPS, "input_reference")
    assert info.value.status == 400 and info.value.param == "input_reference"
    assert "not a PNG, JPEG or WebP image" in info.value.message
    assert ran == []


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "ICO"])
def test_other_image_formats_are_refused_naming_the_accepted_ones(fmt):
    with pytest.raises(APIError) as info:
        decode_image(_encoded(fmt, size=(16, 16)), "image[1]")
    assert info.value.param == "image[1]" and "not a PNG, JPEG or WebP image" in info.value.message


def test_the_error_shows_nothing_of_the_server():
    with pytest.raises(APIError) as info:
        decode_image(b"junk", "image")
    assert "BytesIO" not in info.value.message and "0x" not in info.value.message and "/tmp" not in info.value.message


def test_a_truncated_png_is_unreadable_naming_the_field():
    with pytest.raises(APIError) as info:
        decode_image(_encoded("PNG", size=(64, 64))[:60], "image")
    assert info.value.param == "image" and "not a readable image" in info.value.message


@pytest.mark.parametrize("side", [16000, 100000])
def test_a_header_declaring_billions_of_pixels_is_too_large_not_unreadable(side):
    """Found by an audit: a PNG header past Pillow's bomb limit was 'not a readable image (... decompression bomb
    DOS attack.)'; it is refused as too large, as a smaller oversized image is."""
    data = bytearray(_encoded("PNG", size=(8, 8)))
    data[16:24] = struct.pack(">II", side, side)  # IHDR width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(APIError) as info:
        decode_image(bytes(data), "image")
    assert info.value.param == "image"
    assert info.value.message.startswith(f"'image' is {side * side} pixels by its header, too large (at most 16384 a "
                                         "side and 67108864 pixels)"), info.value.message


def _wrapped(data: bytes, width: int = 76) -> str:
    """Base64 in lines of ``width``, as ``base64 first.png`` writes it."""
    import base64

    text = base64.b64encode(data).decode("ascii")
    return "\n".join(text[i:i + width] for i in range(0, len(text), width)) + "\n"


@pytest.mark.parametrize("url", [
    lambda png: "data:image/png;base64," + _wrapped(png),  # was 'not valid base64'
    lambda png: "data:image/png;base64,\r\n" + _wrapped(png).replace("\n", "\r\n"),
    lambda png: "data:image/png;name=first.png;base64," + _wrapped(png, 10**9),  # RFC 2397 parameters: 'not a data URL'
], ids=["lines", "crlf", "parameters"])
def test_data_urls_as_shells_and_browsers_write_them(url):
    from diffc.serve.uploads import reference_image

    png = _encoded("PNG", size=(40, 24))
    assert reference_image(url(png)).size == (40, 24)


@pytest.mark.parametrize("url,fragment", [
    ("data:image/png;base64,iVBO R@@", "not valid base64"),
    ("data:image/png;charset=utf-8,abc", "not a data URL"),  # not base64
])
def test_malformed_data_urls_stay_refused(url, fragment):
    from diffc.serve.uploads import reference_image

    with pytest.raises(APIError) as info:
        reference_image(url)
    assert info.value.param == "input_reference" and fragment in info.value.message
