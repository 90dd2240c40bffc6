"""Papercuts of ``diffc serve`` (issue 12 sections 5 and 7): the output store after a killed server and on a
timer, the port checked before the model loads, no full-size warm-up on a CPU, --no-progress,
ready/request/shutdown lines, --allowed-hosts, video progress through the VAE decode, truncation warnings per sample."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

import diffc
from diffc.cli.main import main
from diffc.loader import pipeline as pipeline_loader
from diffc.serve.storage import OutputStore, new_id
from tests.helpers import ServeStopped


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(pipeline_loader, "load", refuse)


# ---- the output store -------------------------------------------------------------------------------------

def test_outputs_of_a_killed_server_are_indexed_again_and_its_temporaries_deleted(tmp_path):
    old, new = new_id("img"), new_id("video")
    (tmp_path / f"{old}.png").write_bytes(b"old")
    (tmp_path / f"{new}.mp4").write_bytes(b"new")
    past = time.time() - 100
    os.utime(tmp_path / f"{old}.png", (past, past))
    temporaries = [f".{new_id('img')}.x1y2.png", f"..{new_id('video')}.a.b.mp4"]
    for name in temporaries:
        (tmp_path / name).write_bytes(b"half")
    users = ["notes.txt", "img_mine.png", ".hidden"]
    for name in users:
        (tmp_path / name).write_text("keep me")
    store = OutputStore(tmp_path, keep=10)
    assert [(id_, path.name) for id_, path, _ in store.start()] == [(old, f"{old}.png"), (new, f"{new}.mp4")]
    assert store.get(old) == tmp_path / f"{old}.png" and store.get(new) == tmp_path / f"{new}.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{old}.png", f"{new}.mp4", *users])
    store.add(new_id("img"), None)
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)  # only what a server wrote is deleted


def test_retention_applies_to_indexed_outputs_oldest_first(tmp_path):
    ids = [new_id("img") for _ in range(3)]
    for i, id_ in enumerate(ids):
        path = tmp_path / f"{id_}.png"
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    store = OutputStore(tmp_path, keep=2)
    store.start()
    assert store.get(ids[0]) is None and not (tmp_path / f"{ids[0]}.png").exists()
    assert store.get(ids[1]) is not None and store.get(ids[2]) is not None
    expired = OutputStore(tmp_path, keep=10, ttl_s=50)
    expired.start()
    assert list(tmp_path.iterdir()) == []  # all older than the TTL
    expired.close()


def test_a_restarted_server_serves_the_videos_a_killed_one_left(serve, tmp_path):
    import httpx
    import numpy as np

    from diffc.pipelines.video import write_video

    out = tmp_path / "kept"
    out.mkdir()
    left, broken = new_id("video"), new_id("video")
    frames = (np.random.default_rng(0).random((9, 32, 48, 3)) * 255).astype("uint8")
    write_video(out / f"{left}.mp4", frames, fps=8)
    (out / f"{broken}.mp4").write_bytes(b"not a video")
    server = serve("wan", output_dir=out)
    video = httpx.get(f"{server.url}/v1/videos/{left}", timeout=10).json()
    assert (video["status"], video["size"], video["num_frames"], video["fps"], video["seconds"]) == \
        ("completed", "48x32", 9, 8, "1")
    content = httpx.get(f"{server.url}/v1/videos/{left}/content", timeout=10)
    assert content.status_code == 200 and content.content == (out / f"{left}.mp4").read_bytes()
    assert httpx.get(f"{server.url}/v1/videos/{broken}", timeout=10).status_code == 404
    assert not (out / f"{broken}.mp4").exists()
    assert [v["id"] for v in httpx.get(f"{server.url}/v1/videos", timeout=10).json()["data"]] == [left]


def test_the_ttl_deletes_outputs_without_any_request(tmp_path):
    evicted = []
    store = OutputStore(tmp_path, ttl_s=0.4, on_evict=evicted.append)
    store.start()
    id_ = new_id("img")
    path = store.write(id_, ".png", lambda p: p.write_bytes(b"x"))
    with store._lock:  # recorded without add(), which would prune: only the timer may delete it now
        store._entries[id_] = (path, time.time())
    deadline = time.monotonic() + 10
    while not evicted:  # the file is deleted first, then on_evict is told
        assert time.monotonic() < deadline, "the TTL timer never deleted the output"
        time.sleep(0.05)
    assert evicted == [id_] and not path.exists()
    store.close()


# ---- diffc serve --------------------------------------------------------------------------------------------

def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"diffc serve: error: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n" in err, err
    assert "Traceback" not in err


def test_a_host_that_cannot_be_bound_is_one_line(tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    assert main(["serve", "--host", "203.0.113.7", "--port", "0", "--device", "cpu", "--api-key", "k"]) == 2
    assert "diffc serve: error: --host: cannot listen on 203.0.113.7:0: " in capsys.readouterr().err


@pytest.mark.parametrize("argv,warmup", [([], None), (["--no-warmup"], None)])
def test_no_warm_up_generation_on_a_cpu(tmp_path, monkeypatch, serve_engine_args, argv, warmup):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ServeStopped):
        main(["serve", "--port", "0", "--device", "cpu", *argv])
    assert serve_engine_args["engine"]["warmup"] is warmup


def test_no_progress_hides_the_bars_of_building_the_demo(tmp_path, monkeypatch, capsys, serve_engine_args):
    import transformers

    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))  # the demo is built: transformers writes its shards
    with pytest.raises(ServeStopped):
        main(["serve", "--port", "0", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and not any(bar in err for bar in ("it/s", "%|", "\r")), err
    assert transformers.utils.logging.is_progress_bar_enabled()  # as it was, once the command ended


@pytest.mark.parametrize("argv,allowed", [
    ([], ["127.0.0.1", "::1", "localhost"]),
    (["--host", "localhost"], ["127.0.0.1", "::1", "localhost"]),
    (["--allowed-hosts", "gpu-box,gpu-box.lan", "--allowed-hosts", "*.example.com"],
     ["*.example.com", "gpu-box", "gpu-box.lan"]),
    (["--allowed-hosts", "*"], None),
    (["--host", "0.0.0.0", "--api-key", "k"], None),
])
def test_allowed_hosts_flag(tmp_path, monkeypatch, serve_engine_args, argv, allowed):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ServeStopped):
        main(["serve", "--port", "0", "--device", "cpu", "--max-prompt-chars", "100", *argv])
    assert serve_engine_args["app"]["allowed_hosts"] == allowed
    assert serve_engine_args["engine"]["limits"].max_prompt_chars == 100


def test_allowed_hosts_naming_nothing_is_refused(tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    assert main(["serve", "--port", "0", "--allowed-hosts", " , "]) == 2
    assert "--allowed-hosts: names no host" in capsys.readouterr().err


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_one_line_per_finished_request(serve):
    import httpx

    server = serve()
    logger, handler = logging.getLogger("diffc.serve.requests"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, which also clears the logger's cached decisions
    logger.addHandler(handler)
    try:
        ok = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", "n": 2}, timeout=60)
        bad = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", "size": "40x40"}, timeout=60)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert ok.status_code == 200 and bad.status_code == 400
    lines = handler.lines
    assert len(lines) == 1, lines  # the refused request never became a job
    id_, kind, size, n, status, _, seconds, unit = lines[0].split()
    assert id_.startswith("img_") and (kind, size, n, status, unit) == ("image", "32x32", "n=2", "completed", "s")
    assert float(seconds) >= 0


# ---- progress and warnings in the pipeline -----------------------------------------------------------------

def test_video_progress_goes_through_the_decode(serve):
    import httpx

    seen: list[tuple[str, int, int, int]] = []
    holder: dict = {}

    class Recording:
        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def generate(self, prompt, step_callback=None, decode_callback=None, **kwargs):
            if step_callback is None:  # the warm-up
                return self._pipe.generate(prompt, **kwargs)

            def job_progress():
                return holder["engine"]._running[0][0].progress

            def on_step(done, total):
                step_callback(done, total)
                seen.append(("denoise", done, total, job_progress()))

            def on_decode(done, total):
                decode_callback(done, total)
                seen.append(("decode", done, total, job_progress()))

            return self._pipe.generate(prompt, step_callback=on_step, decode_callback=on_decode, **kwargs)

    server = serve("wan", wrap=Recording)
    holder["engine"] = server.engine
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a fox", "num_frames": 9}, timeout=30)
    video_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/videos/{video_id}", timeout=10).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    decode = [s for s in seen if s[0] == "decode"]
    assert [(d, t) for _, d, t, _ in decode] == [(1, 3), (2, 3), (3, 3)]  # 9 frames: 3 latent frames
    progress = [p for *_, p in seen]
    assert progress == sorted(progress) and progress[-1] == 99
    assert max(p for phase, *_, p in seen if phase == "denoise") == 90
    assert 90 < decode[0][3] < 99


def test_tiled_decode_reports_every_tile():
    import torch

    from diffc.models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan

    vae = AutoencoderKLWan(WAN_VAE_SPECS["tiny"]).eval()
    calls = []
    z = torch.randn(1, vae.config.z_dim, 2, 8, 8)
    with torch.no_grad():
        vae.decode(z, tiled=True, tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=32,
                   tile_sample_stride_width=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 8) for i in range(1, 9)]  # 4 tiles of 2 latent frames


def test_truncation_warnings_name_their_sample_and_quote_briefly(demo_pipes):
    pipe = demo_pipes("flux")
    prompts = ["short", " ".join(["zebra"] * 200)]
    out = pipe.generate(prompts, height=32, width=32, num_inference_steps=1, progress=False)
    assert set(out.sample_warnings) == {1}
    assert all(w.startswith("was truncated to") and "more characters" in w for w in out.sample_warnings[1])
    assert [f"prompt 1 {w}" for w in out.sample_warnings[1]] == out.warnings
    assert all(len(w) < 200 for w in out.warnings)


@pytest.fixture(scope="module")
def demo_pipes(demo_ckpt):
    pipes: dict = {}

    def get(family):
        if family not in pipes:
            pipes[family] = diffc.load(demo_ckpt(family), device="cpu")
        return pipes[family]

    return get


@pytest.mark.parametrize("argv,fragment", [
    (["--shutdown-timeout", "nan"], "--shutdown-timeout: must be a number of seconds from 0"),  # was int(nan) at start
    (["--shutdown-timeout", "inf"], "--shutdown-timeout: must be a number of seconds from 0"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout: must be a number of seconds from 0"),
    (["--output-ttl", "nan"], "--output-ttl: must be a positive number"),  # nan: every output deleted at once
    (["--output-ttl", "inf"], "--output-ttl: must be a positive number"),  # inf: expires_at overflowed on /v1/videos
    (["--fps", "1000"], "--fps: must be from 1 to 240"),
    (["--model-name", " "], "--model-name: is empty"),
    (["--api-key", ""], "--api-key: is empty"),  # was: served with no key at all
    (["--api-key", " k "], "--api-key: holds spaces"),  # could never match (the header's token is stripped)
    (["--api-key", "kä"], "--api-key: holds spaces"),  # could never match (headers are latin-1)
    (["--output-dir", "{file}"], "--output-dir: {file} is not a directory"),  # was a FileExistsError traceback
    (["--output-dir", "{file}/sub"], "--output-dir: cannot create {file}/sub: {file} is not a directory"),
    (["--output-dir", "{ckpt}/vae/out"], "is inside the checkpoint"),
    (["--output-dir", " "], "--output-dir: is empty"),  # was the current directory
    (["--lora-dir", ""], "--lora-dir: is empty"),  # allowed set_lora to read the current directory
    (["--lora-path", "{file}-missing.safetensors"], "--lora-path: file not found: {file}-missing.safetensors"),
])
def test_serve_flag_values_are_refused_before_loading_or_binding(tmp_path, capsys, monkeypatch, no_loading,
                                                                 demo_ckpt, argv, fragment):
    import diffc.cli.serve as cli_serve

    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_serve, "_listen", lambda *a: pytest.fail("the port was bound"))
    (tmp_path / "file").write_text("mine")
    ckpt = demo_ckpt("flux")

    def fill(text: str) -> str:
        return text.replace("{file}", str(tmp_path / "file")).replace("{ckpt}", str(ckpt))

    model = ["--model", str(ckpt)] if "{ckpt}" in " ".join(argv) else []
    assert main(["serve", "--port", "0", "--device", "cpu", *model, *map(fill, argv)]) == 2
    err = capsys.readouterr().err
    assert fill(fragment) in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "file").is_dir()
