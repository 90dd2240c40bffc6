"""Video jobs through the official ``openai`` client: create, poll, list, download, cancel; and their errors."""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks its video API deprecated

SLOW = {"num_inference_steps": 60}  # with a 'slow' prompt: at least 3 s (Flaky)


def _wait_for(client, video_id, statuses=("completed", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in statuses:
            return video
        assert time.monotonic() < deadline, f"video stuck in {video.status}"
        time.sleep(0.05)


def _frames(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]
    return meta, frames


def test_openai_client_video_lifecycle(video_server, tmp_path):
    client = video_server.client()
    video = client.videos.create(prompt="waves on a beach", size="48x32",
                                 extra_body={"seed": 5, "num_frames": 5, "num_inference_steps": 2})
    assert video.object == "video" and video.status in ("queued", "in_progress", "completed")
    assert video.id.startswith("video_") and video.size == "48x32" and video.model == "demo-wan"
    done = client.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    extra = done.model_extra
    assert extra["seed"] == 5 and extra["num_frames"] == 5
    assert extra["inference_time_s"] > 0 and extra["peak_memory_mb"] > 0
    assert video.id in [v.id for v in client.videos.list()]
    content = client.videos.download_content(video.id)
    out = tmp_path / "clip.mp4"
    content.write_to_file(out)
    assert out.read_bytes()[4:8] == b"ftyp"
    meta, frames = _frames(out)
    assert tuple(meta["size"]) == (48, 32) and len(frames) == 5


def test_json_request_with_seconds_and_fps(video_server):
    r = httpx.post(f"{video_server.url}/v1/videos", json={"prompt": "rain", "seconds": 1, "fps": 4, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_frames"] == 5 and body["fps"] == 4 and body["seconds"] == "1"
    assert _wait_for(video_server.client(), body["id"]).status == "completed"


@pytest.mark.parametrize("seconds,fps,frames", [(0.1, 16, 5), (1, 2, 5), (1e-9, 16, 5), (1.1, 4, 5), (2, 4, 9)])
def test_seconds_above_zero_make_a_video_that_lasts(video_server, seconds, fps, frames):
    """The nearest 4k+1 frame count, but never the single frame of a still picture ("seconds": "0" for 0.1 s)."""
    r = httpx.post(f"{video_server.url}/v1/videos", json={"prompt": "rain", "seconds": seconds, "fps": fps,
                                                           "num_inference_steps": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    video_server.client().videos.delete(body["id"])
    assert body["num_frames"] == frames and float(body["seconds"]) == (frames - 1) / fps


def test_list_orders_and_pages(video_server):
    client = video_server.client()
    ids = [client.videos.create(prompt=f"clip {i}", extra_body={"seed": i}).id for i in range(3)]
    for i in ids:
        _wait_for(client, i)
    newest_first = [v.id for v in client.videos.list(limit=100)]
    assert newest_first.index(ids[2]) < newest_first.index(ids[0])
    page = client.videos.list(limit=1, order="asc")
    assert len(page.data) == 1 and page.has_more
    assert [v.id for v in client.videos.list(order="asc", limit=100)] == newest_first[::-1]


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "x", "num_frames": 21}, "num_frames", "invalid_value"),  # over --max-frames (17)
    ({"prompt": "x", "num_frames": 6}, "num_frames", "invalid_value"),  # not 4k+1
    ({"prompt": "x", "seconds": 30}, "seconds", "invalid_value"),
    ({"prompt": "x", "size": "40x32"}, "size", "invalid_value"),
    ({"prompt": "x", "fps": 0}, "fps", "invalid_value"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": "x", "input_reference": "file-1"}, "input_reference", "model_not_supported"),  # a T2V model
    ({"prompt": "x", "frames": 5}, "frames", "unknown_parameter"),
    ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps", "invalid_value"),
])
def test_video_request_errors(video_server, body, param, code):
    r = httpx.post(f"{video_server.url}/v1/videos", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"


def test_input_reference_to_a_text_to_video_model(video_server):
    with pytest.raises(openai.BadRequestError) as info:
        video_server.client().videos.create(prompt="x", input_reference=("ref.png", b"\x89PNG....", "image/png"))
    assert info.value.code == "model_not_supported" and info.value.param == "input_reference"
    assert "takes no input image" in str(info.value)


def test_image_request_to_a_video_model(video_server):
    with pytest.raises(openai.BadRequestError) as info:
        video_server.client().images.generate(prompt="a cat", size="32x32")
    assert info.value.code == "model_not_supported" and "/v1/videos" in str(info.value)


def test_content_of_an_unfinished_video_is_409(video_server):
    client = video_server.client()
    video = client.videos.create(prompt="slow", extra_body=SLOW)
    try:
        r = httpx.get(f"{video_server.url}/v1/videos/{video.id}/content")
        assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"
        r = httpx.get(f"{video_server.url}/v1/videos/{video.id}/content?variant=thumbnail")
        assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
    finally:
        client.videos.delete(video.id)


def test_slow_video_does_not_stall_health_or_metrics(video_server):
    client = video_server.client()
    video = client.videos.create(prompt="slow", extra_body=SLOW)
    try:
        _wait_for(client, video.id, statuses=("in_progress",))
        health = httpx.get(f"{video_server.url}/health", timeout=10)
        metrics = httpx.get(f"{video_server.url}/metrics", timeout=10)
        assert health.status_code == 200 and metrics.status_code == 200
        assert "diffc_jobs_running 1.0" in metrics.text
        assert client.videos.retrieve(video.id).status == "in_progress"  # they answered while it ran
    finally:
        client.videos.delete(video.id)


def test_cancel_running_and_queued_videos_removes_them(video_server):
    client, engine = video_server.client(), video_server.engine
    running = client.videos.create(prompt="slow, to cancel", extra_body=SLOW)
    queued = client.videos.create(prompt="never runs", size="32x32", extra_body={"num_inference_steps": 2})
    progressed = _wait_for(client, running.id, statuses=("in_progress",))
    deadline = time.monotonic() + 60
    while client.videos.retrieve(running.id).progress == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert progressed.status == "in_progress"
    for video in (queued, running):
        deleted = client.videos.delete(video.id)
        assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video.id)
        assert video.id not in [v.id for v in client.videos.list(limit=100)]
    deadline = time.monotonic() + 60
    while engine._running:  # the running batch stops at its next step
        assert time.monotonic() < deadline, "cancelled job kept running"
        time.sleep(0.02)
    assert not any(p.name.startswith((running.id, queued.id, f".{running.id}")) for p in engine.store.root.iterdir())
    # a finished video's file goes too
    done = client.videos.create(prompt="short", extra_body={"seed": 3})
    _wait_for(client, done.id)
    path = engine.store.get(done.id)
    assert path is not None and path.is_file()
    client.videos.delete(done.id)
    assert not path.exists()
    assert httpx.get(f"{video_server.url}/v1/videos/{done.id}/content").status_code == 404


def test_an_input_reference_given_twice_is_refused_by_name(video_server):
    files = [("prompt", (None, "a wave")), ("input_reference", ("a.png", b"\x89PNG....", "image/png")),
             ("input_reference", ("b.png", b"\x89PNG....", "image/png"))]
    r = httpx.post(f"{video_server.url}/v1/videos", files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input_reference" and error["code"] == "duplicate_parameter"


def test_content_of_a_failed_video_says_why(video_server):
    """A failed video will never have content: its download says so and why (it was 'video_not_ready')."""
    client = video_server.client()
    video = client.videos.create(prompt="explode", extra_body={"num_inference_steps": 1})
    assert _wait_for(client, video.id).status == "failed"
    r = httpx.get(f"{video_server.url}/v1/videos/{video.id}/content")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "video_failed" and error["param"] == "video_id" and "out of memory" in error["message"]


def _truncated(server, content_type: str, body: bytes) -> None:
    """Send ``body`` with a Content-Length promising 1000 bytes more, then hang up."""
    import socket

    head = (f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.2)


def test_a_client_that_leaves_mid_body_queues_nothing(video_server):
    """What arrived before the client hung up parsed as a whole request (a JSON object, or the form's finished
    parts) and queued a video nobody would ever learn the id of."""
    gone = 'diffc_http_requests_total{method="POST",route="other",status="499"}'

    def count() -> float:
        line = [x for x in httpx.get(f"{video_server.url}/metrics").text.splitlines() if x.startswith(gone)]
        return float(line[0].split()[-1]) if line else 0.0

    before, ids = count(), {v.id for v in video_server.client().videos.list(limit=100)}
    _truncated(video_server, "application/json", b'{"prompt": "a wave", "num_inference_steps": 1}')
    form = (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na wave\r\n'
            b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\nstill sending')
    _truncated(video_server, "multipart/form-data; boundary=b", form)

    def videos() -> set[str]:
        return {v.id for v in video_server.client().videos.list(limit=100)}

    deadline = time.monotonic() + 10
    while count() < before + 2 and videos() == ids:
        assert time.monotonic() < deadline, "the hang-ups were neither counted as 499s nor queued"
        time.sleep(0.05)
    time.sleep(0.2)
    assert videos() == ids and count() == before + 2


def test_a_first_frame_under_another_name_says_input_reference(video_server):
    r = httpx.post(f"{video_server.url}/v1/videos", json={"prompt": "x", "image": "data:image/png;base64,"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_parameter" and "'input_reference'" in error["message"]
