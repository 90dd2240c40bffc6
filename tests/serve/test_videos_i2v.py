"""Image-to-video over HTTP: ``input_reference`` as a multipart upload (the ``openai`` client) or a base64 data
URL in JSON, the same frames either way; and every bad input image is a 400 naming the field."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks its video API deprecated


def _png(seed: int = 0, size=(40, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _frames(server, video_id: str) -> list[np.ndarray]:
    import imageio_ffmpeg

    deadline = time.monotonic() + 120
    while True:
        body = httpx.get(f"{server.url}/v1/videos/{video_id}").json()
        if body["status"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["status"] == "completed", body
    content = httpx.get(f"{server.url}/v1/videos/{video_id}/content").content
    reader = imageio_ffmpeg.read_frames(_tmp(content))
    meta = next(reader)
    return [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]


def _tmp(content: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False)
    f.write(content)
    f.close()
    return f.name


def test_upload_and_data_url_give_the_same_video(i2v_server):
    client = i2v_server.client()
    video = client.videos.create(prompt="a fox", input_reference=("first.png", _png(0), "image/png"),
                                 extra_body={"seed": 3})
    uploaded = _frames(i2v_server, video.id)
    assert len(uploaded) == 5 and uploaded[0].shape == (32, 32, 3)
    r = httpx.post(f"{i2v_server.url}/v1/videos",
                   json={"prompt": "a fox", "seed": 3, "input_reference": _data_url(_png(0))})
    assert r.status_code == 200, r.text
    as_json = _frames(i2v_server, r.json()["id"])
    assert all(np.array_equal(a, b) for a, b in zip(uploaded, as_json))
    r = httpx.post(f"{i2v_server.url}/v1/videos",
                   json={"prompt": "a fox", "seed": 3, "input_reference": {"image_url": _data_url(_png(1))}})
    assert r.status_code == 200, r.text
    other = _frames(i2v_server, r.json()["id"])
    assert not all(np.array_equal(a, b) for a, b in zip(uploaded, other))  # the image is what changed


@pytest.mark.parametrize("reference, fragment", [
    (None, "is an image-to-video model: send its first frame as input_reference"),
    ("https://example.com/cat.png", "fetches nothing"),
    ("file-abc123", "fetches nothing"),
    ("data:image/png;base64,@@@not-base64", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), "not a PNG, JPEG or WebP image"),
    (_data_url(b""), "empty file"),
    (12, "must be an uploaded image file or a base64 data URL"),
])
def test_bad_references_are_400_naming_the_field(i2v_server, reference, fragment):
    body = {"prompt": "a fox"} if reference is None else {"prompt": "a fox", "input_reference": reference}
    r = httpx.post(f"{i2v_server.url}/v1/videos", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input_reference" and fragment in error["message"], error


def test_an_upload_that_is_not_an_image(i2v_server):
    with pytest.raises(openai.BadRequestError) as info:
        i2v_server.client().videos.create(prompt="x", input_reference=("ref.png", b"\x89PNG....", "image/png"))
    assert info.value.param == "input_reference" and "not a PNG, JPEG or WebP image" in str(info.value)


def test_a_video_job_keeps_its_upload_as_bytes_not_pixels(i2v_server):
    """A job held its decoded input image while queued and, for a video, as long as the video is listed: a 200 KB
    PNG of 8000x8000 pixels held 192 MB each. It keeps the file's bytes and its batch decodes them again."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(buf, format="PNG")
    big = buf.getvalue()
    client = i2v_server.client()
    video = client.videos.create(prompt="a fox", input_reference=("first.png", big, "image/png"),
                                 extra_body={"seed": 3, "num_inference_steps": 1})
    kept = i2v_server.engine.video(video.id).options["image"]
    assert not isinstance(kept, Image.Image) and getattr(kept, "data", None) == big
    small = client.videos.create(prompt="a fox", input_reference=("first.png", _png(0), "image/png"),
                                 extra_body={"seed": 3})
    frames = _frames(i2v_server, small.id)  # decoded again at run time: the same video as from a data URL
    r = httpx.post(f"{i2v_server.url}/v1/videos",
                   json={"prompt": "a fox", "seed": 3, "input_reference": _data_url(_png(0))})
    assert all(np.array_equal(a, b) for a, b in zip(frames, _frames(i2v_server, r.json()["id"])))
    assert getattr(i2v_server.engine.video(small.id).options["image"], "data", None) == _png(0)
    assert len(_frames(i2v_server, video.id)) == 5


def test_a_full_queue_refuses_before_decoding(i2v_server, monkeypatch):
    import dataclasses

    engine = i2v_server.engine
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, max_queue=0))
    r = httpx.post(f"{i2v_server.url}/v1/videos", json={"prompt": "a fox", "input_reference": _data_url(b"junk")})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
