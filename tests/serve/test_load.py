"""Many concurrent requests: each gets its own answer, nothing is lost or duplicated, a full queue answers 429."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import random
import time

import httpx
import numpy as np
from PIL import Image

import diffc
from tests.helpers import psnr_uint8

SIZES = ["32x32", "48x32", "32x48", "64x32"]  # width x height
N_REQUESTS = 36


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_concurrent_mixed_sizes_each_get_their_own_answer(image_server, demo_ckpt):
    rng = random.Random(0)
    requests = [{"prompt": f"request {i}: a {rng.choice(['cat', 'dog', 'fox'])}", "size": SIZES[i % len(SIZES)],
                 "n": 1 + (i % 3 == 0), "seed": 1000 + 10 * i, "num_inference_steps": 1} for i in range(N_REQUESTS)]
    engine = image_server.engine
    batches_before, samples_before = engine.counters.batches, engine.counters.samples
    client = image_server.client()

    def call(req):
        extra = {"seed": req["seed"], "num_inference_steps": req["num_inference_steps"]}
        return client.images.generate(prompt=req["prompt"], size=req["size"], n=req["n"],
                                      response_format="b64_json", extra_body=extra)

    # hold the worker until every request is queued, so they all compete for batches at once: the blocker
    # must be the batch the worker holds before any request is sent (else a request could run alone first)
    image_server.pipe.gate.clear()
    calls = image_server.pipe.calls
    before = len(calls)
    with concurrent.futures.ThreadPoolExecutor(N_REQUESTS + 1) as pool:
        blocker = pool.submit(client.images.generate, prompt="blocker", size="32x32", extra_body={"seed": 0})
        deadline = time.monotonic() + 120
        while not any("blocker" in p for c in calls[before:] for p in c):
            assert time.monotonic() < deadline and not blocker.done(), "the blocker did not reach the worker"
            time.sleep(0.01)
        futures = [pool.submit(call, req) for req in requests]
        while engine.queue_depth < N_REQUESTS:
            assert time.monotonic() < deadline and not any(f.done() for f in futures), "requests did not queue"
            time.sleep(0.01)
        image_server.pipe.gate.set()
        results = [f.result(timeout=300) for f in futures]
        assert len(blocker.result(timeout=60).data) == 1

    # every request got exactly its n images, at its size, with its seeds
    expected_samples = sum(r["n"] for r in requests)
    assert engine.counters.samples - samples_before == expected_samples + 1  # + the blocker
    assert engine.counters.max_batch_seen == engine.limits.max_batch
    assert engine.counters.batches - batches_before < expected_samples
    refs = _references(demo_ckpt("flux"), requests)
    for req, result in zip(requests, results, strict=True):
        w, h = map(int, req["size"].split("x"))
        assert len(result.data) == req["n"] and result.size == req["size"]
        for k, item in enumerate(result.data):
            seed = req["seed"] + k
            assert item.model_extra["seed"] == seed
            image = _decode(item.b64_json)
            assert image.shape == (h, w, 3)
            assert psnr_uint8(image, refs[(req["prompt"], seed)]) >= 40.0
            # and not someone else's: the same size, another request's seed
            other = next(o for o in requests if o is not req and o["size"] == req["size"])
            assert psnr_uint8(image, refs[(other["prompt"], other["seed"])]) < 30.0
    assert engine.queue_depth == 0 and not engine._running


def _references(path, requests):
    """Each sample generated on its own pipeline, one size at a time."""
    pipe = diffc.load(path, device="cpu")
    refs = {}
    for size in SIZES:
        w, h = map(int, size.split("x"))
        group = [(r["prompt"], r["seed"] + k) for r in requests if r["size"] == size for k in range(r["n"])]
        for i in range(0, len(group), 8):
            chunk = group[i:i + 8]
            out = pipe.generate([p for p, _ in chunk], seed=[s for _, s in chunk], height=h, width=w,
                                num_inference_steps=1, progress=False)
            refs.update(zip(chunk, (np.asarray(im) for im in out.images), strict=True))
    return refs


def test_full_queue_answers_429_not_hangs(serve):
    from tests.serve.conftest import Flaky

    server = serve(wrap=Flaky, limits={"max_queue": 2, "max_batch": 1})
    server.engine.pipe.delay_s = 0.2
    n = 16

    def call(i):
        return httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                          json={"prompt": f"burst {i}", "size": "32x32", "seed": i, "num_inference_steps": 1})

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(call, range(n), timeout=180))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert len(r.json()["data"]) == 1
    assert server.engine.counters.rejected == codes.count(429)
    assert server.engine.counters.completed == codes.count(200)
    assert time.monotonic() - start < 120
    # the server still serves once the burst is over
    assert call(99).status_code == 200
    assert 'diffc_errors_total{reason="queue_full"}' in httpx.get(f"{server.url}/metrics").text
