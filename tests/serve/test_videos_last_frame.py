"""First-last-frame video over HTTP: ``last_frame`` beside ``input_reference`` (an uploaded file or a base64 data
URL, as ``input_reference`` takes) is the pipeline's ``image=[first, last]``; a model that cannot take it, or a
Wan2.1 FLF2V request without it, is a 400 naming ``last_frame``."""

from __future__ import annotations

import dataclasses
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import diffc
from diffc.serve.engine import Engine, Limits
from tests.pipelines.conftest import save_wan_variant
from tests.serve.conftest import VIDEO_DEFAULTS, LiveServer
from tests.serve.test_videos_i2v import _data_url, _frames, _png

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks its video API deprecated


@pytest.fixture(scope="module")
def flf2v_server(tmp_path_factory):
    """A server of the tiny Wan2.1 FLF2V checkpoint, warmed up (its warm-up needs two example frames)."""
    ckpt = save_wan_variant("flf2v", tmp_path_factory.mktemp("wan-flf2v"))
    engine = Engine(lambda: diffc.load(ckpt, device="cpu"), model_id="tiny-flf2v", defaults=VIDEO_DEFAULTS,
                    warmup={}, limits=Limits(max_frames=17), output_dir=tmp_path_factory.mktemp("flf2v-outputs"))
    server = LiveServer(engine).start()
    server.ckpt = ckpt
    yield server
    server.stop()


def _post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/videos", json={"prompt": "a fox", "seed": 3, **body}, timeout=120)


def test_a_last_frame_upload_or_data_url_is_the_pipelines_last_frame(flf2v_server, tmp_path):
    first, last = _png(0), _png(1, size=(56, 24))
    r = httpx.post(f"{flf2v_server.url}/v1/videos", data={"prompt": "a fox", "seed": "3"}, timeout=120,
                   files={"input_reference": ("first.png", first, "image/png"),
                          "last_frame": ("last.png", last, "image/png")})
    assert r.status_code == 200, r.text
    uploaded = _frames(flf2v_server, r.json()["id"])
    kept = flf2v_server.engine.video(r.json()["id"]).options["image"]
    assert [getattr(u, "data", None) for u in kept] == [first, last]  # the files' bytes, decoded again at run time
    # what the pipeline makes of image=[first, last] (diffusers' last_image: tests/pipelines/test_wan_i2v.py)
    out = diffc.load(flf2v_server.ckpt, device="cpu").generate(
        "a fox", image=[Image.open(io.BytesIO(first)), Image.open(io.BytesIO(last))], seed=3, progress=False,
        **VIDEO_DEFAULTS)
    out.save(tmp_path / "want.mp4", fps=16)
    want = _read(tmp_path / "want.mp4")
    assert len(uploaded) == 5 and all(np.array_equal(a, b) for a, b in zip(uploaded, want))
    # the openai client: the first frame uploaded, the last as a data URL in extra_body; JSON: both data URLs
    video = flf2v_server.client().videos.create(prompt="a fox", input_reference=("first.png", first, "image/png"),
                                                extra_body={"seed": 3, "last_frame": _data_url(last)})
    assert all(np.array_equal(a, b) for a, b in zip(_frames(flf2v_server, video.id), uploaded))
    r = _post(flf2v_server, input_reference=_data_url(first), last_frame={"image_url": _data_url(last)})
    assert r.status_code == 200, r.text
    assert all(np.array_equal(a, b) for a, b in zip(_frames(flf2v_server, r.json()["id"]), uploaded))
    r = _post(flf2v_server, input_reference=_data_url(first), last_frame=_data_url(_png(2)))
    assert not all(np.array_equal(a, b) for a, b in zip(_frames(flf2v_server, r.json()["id"]), uploaded))


def _read(path) -> list[np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]


@pytest.mark.parametrize("body, param, fragment", [
    ({"input_reference": "first"}, "last_frame", "'tiny-flf2v': this first-last-frame checkpoint (pos_embed_seq_len) "
                                                 "needs a first and a last frame: send the last frame as last_frame"),
    ({"last_frame": "last"}, "input_reference", "is an image-to-video model: send its first frame as input_reference"),
    ({"input_reference": "first", "last_frame": "https://example.com/last.png"}, "last_frame", "fetches nothing"),
    ({"input_reference": "first", "last_frame": "data:image/png;base64,@@@"}, "last_frame", "not valid base64"),
    ({"input_reference": "first", "last_frame": _data_url(b"not a png")}, "last_frame",
     "'last_frame' is not a PNG, JPEG or WebP image"),
    ({"input_reference": "first", "last_frame": 7}, "last_frame",
     "must be an uploaded image file or a base64 data URL"),
    ({"input_reference": "first", "last_image": "last"}, "last_image", "a first-last-frame model's last frame is "
                                                                       "'last_frame'"),
])
def test_bad_last_frames_are_400_naming_the_field(flf2v_server, body, param, fragment):
    given = {"first": _data_url(_png(0)), "last": _data_url(_png(1))}
    r = _post(flf2v_server, **{k: given.get(v, v) if isinstance(v, str) else v for k, v in body.items()})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_a_bad_last_frame_upload_is_400_before_anything_runs(flf2v_server):
    with pytest.raises(openai.BadRequestError) as info:
        flf2v_server.client().videos.create(prompt="x", input_reference=("first.png", _png(0), "image/png"),
                                            extra_body={"last_frame": _data_url(b"\x89PNG....")})
    assert info.value.param == "last_frame" and "not a PNG, JPEG or WebP image" in str(info.value)


def test_models_without_last_frames_refuse_it(i2v_server, video_server):
    r = _post(i2v_server, input_reference=_data_url(_png(0)), last_frame=_data_url(_png(1)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "last_frame", r.text
    assert "this checkpoint takes one image, the first frame: a last frame needs" in r.json()["error"]["message"]
    r = _post(i2v_server, last_frame=_data_url(_png(1)))  # without a first frame: the last frame is what it cannot use
    assert r.status_code == 400 and r.json()["error"]["param"] == "last_frame", r.text
    r = _post(video_server, last_frame=_data_url(_png(1)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "last_frame", r.text
    assert "is a text-to-video model and takes no input image" in r.json()["error"]["message"]


def test_a_full_queue_refuses_before_decoding_either_frame(flf2v_server, monkeypatch):
    engine = flf2v_server.engine
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, max_queue=0))
    r = _post(flf2v_server, input_reference=_data_url(b"junk"), last_frame=_data_url(b"junk"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
