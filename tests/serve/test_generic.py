"""`diffc serve` over generic-backend (diffusers) pipelines: an image model (SD3) and a video model (HunyuanVideo)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.serve.engine import Engine

from .conftest import LiveServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the openai client marks videos deprecated


def _server(path, model_id, defaults, tmp_path):
    engine = Engine(lambda: diffc.load(path, device="cpu"), model_id=model_id, defaults=defaults, warmup={},
                    output_dir=tmp_path / "outputs")
    return LiveServer(engine).start()


def test_image_model(generic_checkpoint, tmp_path):
    path = generic_checkpoint("sd3")
    server = _server(path, "tiny-sd3", {"height": 32, "width": 32, "num_inference_steps": 2}, tmp_path)
    try:
        client = server.client()
        assert [m.id for m in client.models.list()] == ["tiny-sd3"]
        result = client.images.generate(prompt="a calico cat", size="48x32", n=1, response_format="b64_json",
                                        extra_body={"seed": 3, "negative_prompt": "blurry", "guidance_scale": 5.0})
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
        direct = diffc.load(path, device="cpu").generate("a calico cat", seed=3, height=32, width=48,
                                                         num_inference_steps=2, guidance_scale=5.0,
                                                         negative_prompt="blurry", progress=False)
        assert np.array_equal(served, np.asarray(direct.images[0]))
        assert result.data[0].model_extra["seed"] == 3
        r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "waves", "seed": 1})
        assert r.status_code == 400 and "image model" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", "size": "33x32"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "height"
    finally:
        server.stop()


def test_video_model(generic_checkpoint, tmp_path):
    import imageio_ffmpeg

    server = _server(generic_checkpoint("hunyuan"), "tiny-hunyuan",
                     {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}, tmp_path)
    try:
        r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "waves on a beach", "size": "32x32", "seed": 2,
                                                        "num_frames": 5, "fps": 8})
        assert r.status_code == 200, r.text
        video_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (body := httpx.get(f"{server.url}/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["status"] == "completed" and body["seed"] == 2, body
        content = httpx.get(f"{server.url}/v1/videos/{video_id}/content")
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        out = tmp_path / "clip.mp4"
        out.write_bytes(content.content)
        reader = imageio_ffmpeg.read_frames(str(out))
        meta = next(reader)
        assert tuple(meta["size"]) == (32, 32) and len(list(reader)) == 5
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat"})
        assert r.status_code == 400 and "video model" in r.json()["error"]["message"]
    finally:
        server.stop()
