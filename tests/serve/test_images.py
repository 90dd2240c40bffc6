"""Images through the official ``openai`` client and plain HTTP, against a live server on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import psnr_uint8


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_health_models_and_metrics(image_server):
    health = httpx.get(f"{image_server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = image_server.client().models.list()
    assert [m.id for m in models.data] == ["demo-flux"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "diffc"
    assert image_server.client().models.retrieve("demo-flux").id == "demo-flux"
    metrics = httpx.get(f"{image_server.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("diffc_queue_depth", "diffc_request_latency_seconds", "diffc_stage_seconds", "diffc_errors_total",
                 "diffc_ready 1.0"):
        assert name in metrics.text


def test_openai_client_b64_json_matches_the_pipeline(image_server):
    client = image_server.client()
    result = client.images.generate(prompt="a calico cat playing piano", size="48x32", n=2,
                                    response_format="b64_json", extra_body={"seed": 123, "num_inference_steps": 2})
    assert len(result.data) == 2 and result.size == "48x32"
    images = [_decode(d.b64_json) for d in result.data]
    assert all(im.shape == (32, 48, 3) for im in images)
    raw = result.model_extra or {}
    assert raw["inference_time_s"] > 0 and raw["peak_memory_mb"] > 0
    assert [d.model_extra["seed"] for d in result.data] == [123, 124]
    ref = image_server.pipe._pipe
    for image, seed in zip(images, (123, 124), strict=True):
        want = ref.generate("a calico cat playing piano", seed=seed, height=32, width=48, num_inference_steps=2,
                            progress=False).images[0]
        assert psnr_uint8(image, want) >= 40.0
    assert psnr_uint8(images[0], images[1]) < 30.0


def test_curl_style_request_with_defaults(image_server):
    # `curl -d` sends application/x-www-form-urlencoded; the body is still read as JSON
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=b'{"prompt": "a red fox", "seed": 1}',
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "32x32" and body["num_inference_steps"] == 2
    assert _decode(body["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_server_defaults_fill_what_a_request_leaves_out(image_server):
    """A server's text length (a compiled artifact's: the HTTP API has no field for it) and guidance hold for
    every request that gives none; a request's own guidance wins."""
    engine = image_server.engine
    engine.defaults.update(max_sequence_length=16, guidance_scale=2.5)
    try:
        job = engine.prepare("image", "a cat")
        assert job.options["max_sequence_length"] == 16 and job.options["guidance_scale"] == 2.5
        assert engine.prepare("image", "a cat", guidance_scale=4.0).options["guidance_scale"] == 4.0
    finally:
        del engine.defaults["max_sequence_length"], engine.defaults["guidance_scale"]
    assert engine.prepare("image", "a cat").options["max_sequence_length"] == 512  # FLUX's own default


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_url_response_serves_the_file(image_server, fmt, magic):
    client = image_server.client()
    result = client.images.generate(prompt="a lighthouse", size="32x32", response_format="url",
                                    output_format=fmt, extra_body={"seed": 9})
    url = result.data[0].url
    assert url.startswith(f"{image_server.url}/v1/images/img_") and url.endswith("/content")
    got = httpx.get(url)
    assert got.status_code == 200 and got.content.startswith(magic)
    assert got.headers["content-type"] == f"image/{fmt}"
    image_id = url.split("/")[-2]
    files = [p.name for p in image_server.engine.store.root.iterdir()]
    assert f"{image_id}.{fmt}" in files


def test_head_answers_where_get_does(image_server):
    """``curl -I`` and HEAD health probes got a 405 (RFC 9110: a server answering GET answers HEAD)."""
    for path in ("/health", "/metrics", "/v1/models", "/v1/videos"):
        head, get = httpx.head(f"{image_server.url}{path}"), httpx.get(f"{image_server.url}{path}")
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    body = {"prompt": "a lighthouse", "size": "32x32", "response_format": "url", "seed": 3}
    url = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=120).json()["data"][0]["url"]
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(httpx.get(url).content)
    assert httpx.head(f"{image_server.url}/v1/images/img_{'0' * 32}/content").status_code == 404


@pytest.mark.parametrize("range_header,status,part", [
    ("bytes=0-9", 206, slice(0, 10)),
    ("bytes=-4", 206, slice(-4, None)),
    ("bytes=5-1", 200, slice(None)),  # malformed: ignored, the whole file (RFC 9110), not a plain-text 400
    ("garbage", 200, slice(None)),
    ("bytes=1-x", 200, slice(None)),
    ("bytes=99999999-", 416, None),  # well formed but past the end
])
def test_stored_files_answer_ranges_and_ignore_malformed_ones(image_server, range_header, status, part):
    body = {"prompt": "a lighthouse", "size": "32x32", "response_format": "url", "seed": 3}
    url = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=120).json()["data"][0]["url"]
    whole = httpx.get(url).content
    got = httpx.get(url, headers={"Range": range_header})
    assert got.status_code == status, got.text
    if part is not None:
        assert got.content == whole[part]


def test_an_unsatisfiable_range_is_a_json_416_with_content_range(image_server):
    body = {"prompt": "a lighthouse", "size": "32x32", "response_format": "url", "seed": 3}
    url = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=120).json()["data"][0]["url"]
    size = len(httpx.get(url).content)
    for header in ("bytes=99999999-", "bytes=-0"):
        got = httpx.get(url, headers={"Range": header})
        assert got.status_code == 416 and got.headers["content-range"] == f"bytes */{size}"
        assert got.json()["error"]["code"] == "range_not_satisfiable" and str(size) in got.json()["error"]["message"]


def test_an_output_deleted_after_lookup_is_a_404_not_a_500(image_server, monkeypatch, tmp_path):
    body = {"prompt": "a lighthouse", "size": "32x32", "response_format": "url", "seed": 3}
    url = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=120).json()["data"][0]["url"]
    monkeypatch.setattr(image_server.engine.store, "get", lambda id_: tmp_path / "gone.png")  # removed meanwhile
    got = httpx.get(url)
    assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"
    assert str(tmp_path) not in got.text


def test_a_null_n_is_one_image(image_server):
    r = httpx.post(f"{image_server.url}/v1/images/generations", json={"prompt": "a fox", "n": None}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


@pytest.mark.parametrize("strength", ["abc", "nan", 2.0])
def test_a_lora_strength_without_adapters_is_refused(image_server, strength):
    body = {"prompt": "a fox", "lora": [], "lora_strength": strength}
    r = httpx.post(f"{image_server.url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora_strength"


def test_seed_is_reported_and_random_when_omitted(image_server):
    client = image_server.client()
    a = client.images.generate(prompt="a boat", size="32x32", response_format="b64_json")
    b = client.images.generate(prompt="a boat", size="32x32", response_format="b64_json")
    seeds = [a.data[0].model_extra["seed"], b.data[0].model_extra["seed"]]
    assert all(isinstance(s, int) for s in seeds)
    again = client.images.generate(prompt="a boat", size="32x32", response_format="b64_json",
                                   extra_body={"seed": seeds[0]})
    assert psnr_uint8(_decode(again.data[0].b64_json), _decode(a.data[0].b64_json)) >= 40.0


def test_retention_keeps_the_newest_outputs(serve):
    server = serve(keep_outputs=2)
    client = server.client()
    urls = [client.images.generate(prompt=f"tree {i}", size="32x32", response_format="url",
                                   extra_body={"seed": i}).data[0].url for i in range(3)]
    assert httpx.get(urls[0]).status_code == 404
    assert [httpx.get(u).status_code for u in urls[1:]] == [200, 200]
    assert len([p for p in server.engine.store.root.iterdir() if not p.name.startswith(".")]) == 2
    # found by an audit: n over --keep-outputs as URLs answered with URLs retention had already deleted
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                   json={"prompt": "trees", "size": "32x32", "n": 3, "response_format": "url"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--keep-outputs" in r.text
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120, json={"prompt": "trees", "size": "32x32", "n": 3})
    assert r.status_code == 200 and len(r.json()["data"]) == 3  # b64_json keeps nothing


def test_output_store_age_limit(tmp_path):
    import time

    from diffc.serve.storage import OutputStore

    store = OutputStore(tmp_path / "out", keep=10, ttl_s=0.2)
    path = store.write("img_" + "0" * 32, ".png", lambda p: p.write_bytes(b"x"))
    store.add("img_" + "0" * 32, path)
    assert store.get("img_" + "0" * 32) == path
    time.sleep(0.3)
    assert store.get("img_" + "0" * 32) is None and not path.exists()
    store.close()
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())
