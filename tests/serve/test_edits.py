"""POST /v1/images/edits with the real openai client and raw multipart, on a tiny FLUX.1 Kontext model."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import shutil
import time

import httpx
import numpy as np
import openai
import pytest
import requests
from PIL import Image

import diffc
from diffc.pipelines import flux_kontext
from diffc.serve.engine import Engine
from tests.helpers import psnr_uint8
from tests.serve.conftest import Flaky, LiveServer

TINY_RESOLUTIONS = ((24, 40), (32, 32), (40, 24))  # (width, height): the tiny model's stand-in for ~1 MP
SETTINGS = {"num_inference_steps": 2, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def kontext_server(flux_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext-serve") / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    holder = {}

    def load():
        holder["pipe"] = Flaky(diffc.load(root, device="cpu"))
        return holder["pipe"]

    engine = Engine(load, model_id="kontext-tiny",
                    defaults={"height": 32, "width": 32, **SETTINGS},  # the warm-up size; edits follow the input
                    warmup={}, output_dir=tmp_path_factory.mktemp("edit-outputs"))
    server = LiveServer(engine).start()
    server.ckpt = root
    server.pipe = holder["pipe"]
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def tiny_resolutions(monkeypatch):
    monkeypatch.setattr(flux_kontext, "PREFERRED_RESOLUTIONS", TINY_RESOLUTIONS)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _input(w=50, h=30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))))


def test_openai_client_edit_follows_the_input_size(kontext_server):
    client = kontext_server.client()
    image = _input()
    result = client.images.edit(model="kontext-tiny", image=("in.png", _png(image), "image/png"),
                                prompt="make it night", n=2, extra_body={"seed": 9})
    assert len(result.data) == 2
    got = [_decoded(d) for d in result.data]
    assert got[0].shape == (24, 40, 3)  # 50x30 input -> the (40, 24) resolution nearest its aspect ratio
    want = diffc.load(kontext_server.ckpt).generate(["make it night"] * 2, image=image, seed=[9, 10], progress=False,
                                                    **SETTINGS)
    for g, w in zip(got, want.images):
        assert psnr_uint8(g, w) >= 40.0  # the server's batch is the pipeline's output (PNG is lossless)


def test_size_and_url_response(kontext_server):
    client = kontext_server.client()
    result = client.images.edit(image=("in.jpg", _png(_input(), "JPEG"), "image/jpeg"), prompt="add snow",
                                size="48x32", response_format="url")
    content = requests.get(result.data[0].url, timeout=60)
    assert content.status_code == 200
    assert Image.open(io.BytesIO(content.content)).size == (48, 32)


def _raw(server, files, **fields):
    data = {"prompt": "make it night", **fields}
    return requests.post(f"{server.url}/v1/images/edits", data=data, files=files, timeout=120)


@pytest.mark.parametrize("files,param,fragment", [
    ([("image", ("a.png", b"not an image at all", "image/png"))], "image", "not a PNG, JPEG or WebP image"),
    ([("image", ("a.png", b"", "image/png"))], "image", "empty file"),
    ([("image", ("a.tif", _png(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff"))], "image", "not a PNG, JPEG or WebP"),
    ([("image", ("a.png", _png(Image.new("1", (17000, 1))), "image/png"))], "image", "too large"),
    ([("image[]", ("a.png", _png(_input()), "image/png")), ("image[]", ("b.png", _png(_input()), "image/png"))],
     "image", "at most 1 input image"),
    # more files than the model takes: refused before any is decoded (the junk one is never read)
    ([("image[]", ("a.png", _png(_input()), "image/png")), ("image[]", ("b.png", b"junk", "image/png"))],
     "image", "at most 1 input image"),
    ([("n", (None, "1"))], "image", "Missing required parameter"),  # multipart without a file
    ([("image", ("a.png", _png(_input()), "image/png")), ("mask", ("m.png", _png(_input()), "image/png"))],
     "mask", "not supported"),
    ([("image", ("a.png", _png(_input()), "image/png")), ("input_fidelity", (None, "max"))], "input_fidelity",
     "'low' or 'high'"),  # OpenAI's values only (any text was accepted)
])
def test_bad_uploads_are_400_naming_the_field(kontext_server, files, param, fragment):
    response = _raw(kontext_server, files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_each_file_is_named_where_the_model_takes_several(kontext_server, monkeypatch):
    pipe = kontext_server.pipe._pipe
    monkeypatch.setattr(pipe, "spec", dataclasses.replace(pipe.spec, max_images=2))
    files = [("image[]", ("a.png", _png(_input()), "image/png")), ("image[]", ("b.png", b"junk", "image/png"))]
    error = _raw(kontext_server, files).json()["error"]
    assert error["param"] == "image[1]" and "not a PNG, JPEG or WebP image" in error["message"]


def test_a_model_that_needs_an_image_points_generations_to_edits(kontext_server, monkeypatch):
    pipe = kontext_server.pipe._pipe
    monkeypatch.setattr(pipe, "spec", dataclasses.replace(pipe.spec, image_input="required"))
    r = requests.post(f"{kontext_server.url}/v1/images/generations", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "image" and "POST /v1/images/edits" in error["message"]


def test_more_files_than_the_route_takes_name_the_field(kontext_server):
    files = [("image[]", (f"{i}.png", b"x", "image/png")) for i in range(18)]
    response = _raw(kontext_server, files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "at most 16 images" in error["message"]


def test_webp_larger_than_it_can_hold_is_refused_before_the_generation(kontext_server):
    calls = len(kontext_server.pipe.calls)
    files = [("image", ("a.png", _png(_input()), "image/png"))]
    response = _raw(kontext_server, files, size="16384x16", output_format="webp")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "output_format" and "at most 16383 pixels a side" in error["message"]
    assert len(kontext_server.pipe.calls) == calls


def test_json_body_is_refused(kontext_server):
    response = requests.post(f"{kontext_server.url}/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_openai_client_sees_a_bad_request(kontext_server):
    with pytest.raises(openai.BadRequestError) as info:
        kontext_server.client().images.edit(image=("a.png", b"GIF89a nonsense", "image/png"), prompt="x")
    assert info.value.body["param"] == "image"


def test_text_to_video_model_refuses_edits_naming_its_route(video_server):
    files = [("image", ("in.png", _png(_input()), "image/png"))]
    error = _raw(video_server, files).json()["error"]
    assert error["param"] == "image" and "text-to-video" in error["message"] and "POST /v1/videos" in error["message"]


def test_text_to_image_model_refuses_edits(image_server):
    with pytest.raises(openai.BadRequestError) as info:
        image_server.client().images.edit(image=("in.png", _png(_input()), "image/png"), prompt="make it night")
    assert info.value.body["param"] == "image"
    assert "takes no input image" in info.value.body["message"]


def test_an_edit_whose_client_leaves_is_cancelled(kontext_server):
    """A client that hangs up stops its edit job at the next step (the route waits on the job or the client)."""
    engine, pipe = kontext_server.engine, kontext_server.pipe
    completed = engine.counters.completed
    pipe.step_delay_s = 0.2
    try:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{kontext_server.url}/v1/images/edits", timeout=httpx.Timeout(30, read=1.0),
                       data={"prompt": "slow and abandoned", "num_inference_steps": "100"},
                       files={"image": ("in.png", _png(_input()), "image/png")})
        deadline = time.monotonic() + 15
        while (engine._running or engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine._running and engine.queue_depth == 0, "the abandoned edit kept running"
        assert time.monotonic() - start < 15  # 100 steps would take 20 s
    finally:
        pipe.step_delay_s = 0.05
    assert engine.counters.completed == completed


def test_a_field_given_twice_is_refused_by_name_but_images_may_repeat(kontext_server):
    files = [("image", ("a.png", _png(_input()), "image/png")), ("size", (None, "32x32")), ("size", (None, "40x24"))]
    response = _raw(kontext_server, files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "size" and error["code"] == "duplicate_parameter"


def _utf7_form(name: str, value: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body whose text parts are read as UTF-7, which can spell a lone surrogate (``+2AA-``)."""
    parts = [b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it night\r\n',
             f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n",
             b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
             + _png(_input()) + b"\r\n--b--\r\n"]
    return b"".join(parts), {"content-type": "multipart/form-data; boundary=b; charset=utf-7"}


@pytest.mark.parametrize("name,value,param", [("+2AA-", b"1", None), ("size", b"+2AA-", "size")])
def test_a_lone_surrogate_in_a_form_is_a_400_naming_it(kontext_server, name, value, param):
    """As generations and videos already refused: a field name holding one was "Invalid value for 'None'"."""
    body, headers = _utf7_form(name, value)
    response = requests.post(f"{kontext_server.url}/v1/images/edits", data=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"]


def test_uploads_are_decoded_two_at_a_time(kontext_server, monkeypatch):
    """A small file can decode to 64 Mpx (hundreds of MB while it decodes): a burst of requests decoded all at once
    (as many as the thread pool's 40), now at most ``DECODE_SLOTS``; the others wait their turn."""
    import threading

    from diffc.serve import edit_routes
    from diffc.serve.uploads import DECODE_SLOTS

    lock, now, most = threading.Lock(), [0], [0]
    real = edit_routes.decode_image

    def counted(data, field):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.2)
            return real(data, field)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(edit_routes, "decode_image", counted)
    files = [("image", ("a.png", b"not an image", "image/png"))]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _raw(kontext_server, files), range(8)))
    assert all(a.status_code == 400 and "not a PNG" in a.json()["error"]["message"] for a in answers)
    assert most[0] == DECODE_SLOTS == 2


def test_a_full_queue_refuses_before_decoding(kontext_server, monkeypatch):
    """The 429 came only after the uploads were decoded (waiting on the decode slots in a burst)."""
    engine = kontext_server.engine
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, max_queue=0))
    response = _raw(kontext_server, [("image", ("a.png", b"not an image, never read", "image/png"))])
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "queue_full" and int(response.headers["retry-after"]) >= 1
