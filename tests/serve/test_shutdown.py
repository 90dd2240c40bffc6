"""Graceful shutdown: in-flight work finishes (or fails cleanly after the timeout), queued jobs fail, no files stay."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.serve.conftest import Flaky

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _wait(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _start_jobs(server, steps):
    client = server.client()
    running = client.videos.create(prompt="slow and long", extra_body={"num_inference_steps": steps})
    queued = client.videos.create(prompt="waiting", size="48x32")
    running, queued = server.engine.video(running.id), server.engine.video(queued.id)
    _wait(lambda: running.status == "in_progress" and running.progress > 0)
    return running, queued


def _assert_clean(server):
    engine = server.engine
    assert engine.state == "stopped" and not any(t.is_alive() for t in engine._threads)
    assert engine.queue_depth == 0
    assert list(engine.store.root.iterdir()) == []  # no outputs, no half-written temporary files


def test_shutdown_finishes_the_running_job_and_fails_queued_ones(serve):
    server = serve("wan", wrap=Flaky, limits={"max_batch": 1})
    running, queued = _start_jobs(server, steps=12)
    server.stop()
    assert running.status == "completed" and running.error is None
    assert queued.status == "failed" and queued.error.code == "shutting_down"
    _assert_clean(server)


def test_shutdown_timeout_fails_the_running_job_cleanly(serve):
    server = serve("wan", wrap=Flaky, limits={"max_batch": 1}, app={"shutdown_timeout_s": 0.1})
    running, queued = _start_jobs(server, steps=100)
    server.stop(timeout=60)
    assert running.status == "failed" and running.error.code == "shutting_down"
    assert queued.status == "failed" and queued.error.code == "shutting_down"
    _assert_clean(server)


def test_in_flight_image_request_is_answered_during_shutdown(serve):
    server = serve(wrap=Flaky)
    pipe = server.engine.pipe
    pipe.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{server.url}/v1/images/generations", timeout=120,
                              json={"prompt": "blocker in flight", "seed": 1})
        _wait(lambda: server.engine._running)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        time.sleep(0.2)
        pipe.gate.set()
        response = pending.result(120)
        stopper.join(120)
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    _assert_clean(server)
