"""Server isolation and resource bounds (issue 12 section 5): what one client sends cannot reach another
client's answer, grow the server's memory, crash a request into a 500, or reach a loopback server from a
web page; a client that leaves stops its job; a write that fails leaves no file."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import string
import time

import httpx
import pytest

from diffc.serve.hardening import default_allowed_hosts, host_allowed, parse_allowed_hosts
from tests.full_disk import full_disk_ffmpeg


def _error_body(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def _wait(predicate, timeout_s: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- /metrics label cardinality ---------------------------------------------------------------------------

def test_random_methods_and_paths_do_not_grow_metrics(image_server):
    rng = random.Random(0)
    with httpx.Client(base_url=image_server.url, timeout=30) as client:
        for _ in range(40):
            method = "".join(rng.choices(string.ascii_uppercase, k=12))
            path = "/" + "".join(rng.choices(string.ascii_lowercase, k=16))
            client.request(method, path)
            client.request(method, "/v1/models")
        client.get("/health")
        metrics = client.get("/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("diffc_http_requests_total{")]
    methods = {line.split('method="')[1].split('"')[0] for line in lines}
    routes = {line.split('route="')[1].split('"')[0] for line in lines}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert "other" in methods and "/health" in routes and "other" in routes
    assert all(r == "other" or r.startswith("/") and len(r) < 40 for r in routes), routes
    assert len(lines) < 20, lines


# ---- malformed and oversized input ------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,fragment", [
    ("[" * 100_000, None, "nests deeper than"),
    ('{"prompt": "x", "cache": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}", None, "nests deeper than"),
    ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", None, "a number is too large"),
    ('{"prompt": "a \\ud800 cat"}', "prompt", "lone surrogate"),
    ('{"prompt": "a cat", "model": "\\udfff"}', "model", "lone surrogate"),
    ('{"prompt": "a cat", "\\ud800": 1}', None, "lone surrogate"),
], ids=["deep-list", "deep-cache", "huge-int", "surrogate-prompt", "surrogate-model", "surrogate-key"])
def test_malformed_json_is_a_400(image_server, body, param, fragment):
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=body.encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    error = _error_body(r)
    assert fragment in error["message"] and error["param"] == param, error
    assert httpx.get(f"{image_server.url}/health", timeout=10).status_code == 200  # the server is still there


def test_huge_numbers_within_python_limits_are_400s(image_server):
    for field in ("seed", "n", "num_inference_steps", "guidance_scale"):
        r = httpx.post(f"{image_server.url}/v1/images/generations", timeout=30,
                       content=f'{{"prompt": "x", "{field}": {"9" * 4000}}}'.encode())
        assert _error_body(r)["param"] in (field, "size"), r.text[:200]
        assert len(r.content) < 6000


def test_a_huge_prompt_is_refused_up_front(image_server):
    calls = len(image_server.pipe.calls)
    for field in ("prompt", "negative_prompt"):
        body = {"prompt": "a cat", field: "a cat " * 100_000}  # 600 kB, under the body limit
        start = time.monotonic()
        r = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=30)
        error = _error_body(r)
        assert error["param"] == field and "at most 32000" in error["message"], error
        assert len(r.content) < 500 and time.monotonic() - start < 5
    assert len(image_server.pipe.calls) == calls  # nothing was tokenized or generated


# ---- one request's warnings -------------------------------------------------------------------------------

def test_truncation_warnings_speak_only_of_their_own_request(image_server):
    pipe = image_server.pipe
    pipe.gate.clear()
    prompts = {name: " ".join([name] * 120) + f" secret{name}" for name in ("alpha", "bravo")}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(httpx.post, f"{image_server.url}/v1/images/generations",
                              json={"prompt": "blocker", "num_inference_steps": 1}, timeout=120)
        _wait(lambda: any("blocker" in c[0] for c in pipe.calls), what="the blocker to run")
        futures = {name: pool.submit(httpx.post, f"{image_server.url}/v1/images/generations",
                                     json={"prompt": p, "seed": 1}, timeout=120) for name, p in prompts.items()}
        _wait(lambda: image_server.engine.queue_depth == 2, what="both requests to queue")
        pipe.gate.set()
        assert blocker.result().status_code == 200
        answers = {name: f.result() for name, f in futures.items()}
    assert any(set(call) == set(prompts.values()) for call in pipe.calls), "the two requests were not batched"
    for name, r in answers.items():
        assert r.status_code == 200, r.text
        warnings = r.json()["warnings"]
        other = "bravo" if name == "alpha" else "alpha"
        assert warnings and all(w.startswith("the prompt was truncated") for w in warnings), warnings
        assert not any(other in w for w in warnings), warnings
        assert all(len(w) < 250 for w in warnings), warnings  # the dropped text is quoted briefly


# ---- a client that disconnects ----------------------------------------------------------------------------

def _leave_early(url: str, body: dict, after_s: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/images/generations", json=body, timeout=httpx.Timeout(30, read=after_s))


def test_a_client_that_leaves_frees_its_queue_slot(image_server):
    engine, pipe = image_server.engine, image_server.pipe
    cancelled = engine.metrics.jobs.labels("image", "cancelled")._value.get()
    pipe.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(httpx.post, f"{image_server.url}/v1/images/generations",
                              json={"prompt": "blocker", "num_inference_steps": 1}, timeout=120)
        _wait(lambda: any("blocker" in c[0] for c in pipe.calls[-1:]), what="the blocker to run")
        _leave_early(image_server.url, {"prompt": "queued then abandoned", "size": "48x32"}, after_s=1.0)
        _wait(lambda: engine.queue_depth == 0, timeout_s=10, what="the abandoned job to leave the queue")
        pipe.gate.set()
        assert blocker.result().status_code == 200
    assert not any("abandoned" in c[0] for c in pipe.calls)
    _wait(lambda: engine.metrics.jobs.labels("image", "cancelled")._value.get() == cancelled + 1, timeout_s=10,
          what="the cancellation to be counted")


def test_a_client_that_leaves_stops_its_running_job(image_server):
    engine, pipe = image_server.engine, image_server.pipe
    completed = engine.counters.completed
    pipe.step_delay_s = 0.2
    try:
        start = time.monotonic()
        _leave_early(image_server.url, {"prompt": "slow and abandoned", "num_inference_steps": 100}, after_s=1.0)
        _wait(lambda: not engine._running and engine.queue_depth == 0, timeout_s=15, what="the batch to stop")
        assert time.monotonic() - start < 15  # 100 steps would take 20 s
    finally:
        pipe.step_delay_s = 0.05
    assert engine.counters.completed == completed
    r = httpx.post(f"{image_server.url}/v1/images/generations", json={"prompt": "next"}, timeout=60)
    assert r.status_code == 200


# ---- a write that fails -----------------------------------------------------------------------------------

def test_write_video_fails_on_a_full_disk_and_leaves_nothing(tmp_path, monkeypatch):
    import numpy as np

    from diffc.errors import OutputError
    from diffc.pipelines.video import write_video

    frames = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype("uint8")
    assert write_video(tmp_path / "ok.mp4", frames).stat().st_size > 1024  # bigger than the limit below
    full_disk_ffmpeg(monkeypatch)
    with pytest.raises(OutputError) as info:
        write_video(tmp_path / "full.mp4", frames)
    assert "full.mp4" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4"]


def test_a_video_that_cannot_be_written_fails_its_job(serve, monkeypatch):
    server = serve("wan")
    full_disk_ffmpeg(monkeypatch)
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a fox"}, timeout=30)
    assert r.status_code == 200, r.text
    video_id = r.json()["id"]

    def status():
        return httpx.get(f"{server.url}/v1/videos/{video_id}", timeout=10).json()

    _wait(lambda: status()["status"] in ("completed", "failed"), timeout_s=60, what="the video to finish")
    video = status()
    assert video["status"] == "failed" and video["error"]["code"] == "output_write_failed", video
    assert str(server.engine.store.root) not in video["error"]["message"]  # no server path in the answer
    assert httpx.get(f"{server.url}/v1/videos/{video_id}/content", timeout=10).status_code == 409
    assert list(server.engine.store.root.iterdir()) == []


def test_an_image_that_cannot_be_written_is_a_500_and_leaves_nothing(image_server, monkeypatch):
    from PIL import Image

    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    before = set(image_server.engine.store.root.iterdir())
    monkeypatch.setattr(Image.Image, "save", save)
    r = httpx.post(f"{image_server.url}/v1/images/generations", timeout=60,
                   json={"prompt": "a cat", "n": 2, "response_format": "url"})
    error = _error_body(r, 500)
    assert error["code"] == "output_write_failed" and "No space left on device" in error["message"], error
    assert set(image_server.engine.store.root.iterdir()) == before


# ---- DNS rebinding ----------------------------------------------------------------------------------------

def test_a_loopback_server_answers_only_its_own_host_names(serve):
    server = serve(app={"allowed_hosts": default_allowed_hosts("127.0.0.1")})
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}, timeout=10).status_code == 200, host
    for host in (f"evil.example:{port}", "attacker.localhost.example", f"127.0.0.1.evil.example:{port}", ""):
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, headers={"Host": host}, timeout=10)
        error = _error_body(r)
        assert error["code"] == "invalid_host" and "--allowed-hosts" in error["message"], error
    assert httpx.get(f"{server.url}/metrics", headers={"Host": "evil.example"}, timeout=10).status_code == 400


def test_allowed_host_settings():
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert default_allowed_hosts("::1") == ["127.0.0.1", "::1", "localhost"]
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.1.2.3") is None
    assert parse_allowed_hosts(["a.example, B.example", "c.example"]) == ["a.example", "b.example", "c.example"]
    assert parse_allowed_hosts(["a.example", "*"]) is None
    allowed = parse_allowed_hosts(["*.example.com", "gpu-box"])
    assert host_allowed("img.example.com:30000", allowed) and host_allowed("GPU-BOX", allowed)
    assert not host_allowed("example.com.evil", allowed) and not host_allowed(None, allowed)
    assert host_allowed("anything", None)
    # found by an audit: a name given with its port never matched (Host headers are compared without theirs)
    allowed = parse_allowed_hosts(["gpu-box:30000,[::1]:30000", "10.0.0.2:8000"])
    assert allowed == ["10.0.0.2", "::1", "gpu-box"]
    assert host_allowed("gpu-box:30000", allowed) and host_allowed("[::1]:30000", allowed)
