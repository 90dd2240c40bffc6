"""``diffc serve`` on a GPU (skipped without CUDA): the warm-up still runs there, and a video job on the
GPU reports its decode progress and completes."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

import diffc
from diffc.cli.main import main
from diffc.serve.engine import Engine, Limits
from tests.helpers import ServeStopped
from tests.serve.conftest import VIDEO_DEFAULTS, LiveServer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_warm_up_runs_on_a_gpu(tmp_path, monkeypatch, serve_engine_args):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ServeStopped):
        main(["serve", "--port", "0", "--device", "cuda"])
    assert serve_engine_args["engine"]["warmup"] == {}
    with pytest.raises(ServeStopped):
        main(["serve", "--port", "0", "--device", "cuda", "--no-warmup"])
    assert serve_engine_args["engine"]["warmup"] is None


def test_a_video_job_on_the_gpu_reports_its_decode(demo_ckpt, tmp_path):
    decode_progress: list[int] = []
    holder: dict = {}

    class Recording:
        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def generate(self, prompt, decode_callback=None, **kwargs):
            if decode_callback is None:  # the warm-up
                return self._pipe.generate(prompt, **kwargs)

            def on_decode(done, total):
                decode_callback(done, total)
                decode_progress.append(holder["engine"]._running[0][0].progress)

            return self._pipe.generate(prompt, decode_callback=on_decode, **kwargs)

    engine = Engine(lambda: Recording(diffc.load(demo_ckpt("wan"), device="cuda")), model_id="demo-wan",
                    defaults=VIDEO_DEFAULTS, warmup={}, limits=Limits(max_frames=17), output_dir=tmp_path / "out")
    holder["engine"] = engine
    server = LiveServer(engine).start()
    try:
        r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a fox", "num_frames": 9}, timeout=30)
        video_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (video := httpx.get(f"{server.url}/v1/videos/{video_id}", timeout=10).json())["status"] != "completed":
            assert video["status"] != "failed" and time.monotonic() < deadline, video
            time.sleep(0.1)
        assert video["progress"] == 100
        assert len(decode_progress) == 3 and 90 < decode_progress[0] and decode_progress[-1] == 99
    finally:
        server.stop()
