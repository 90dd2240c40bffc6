"""The ``cache`` field of a request: a kind or ``{"kind": ..., options}``, validated against the model (a 400
naming the option), run for that request only, and never batched with requests of other cache settings."""

from __future__ import annotations

import httpx
import pytest

from diffc.errors import InvalidArgumentError
from diffc.runtime.cache import CacheConfig

SKIPPING = {"kind": "fbcache", "threshold": 50, "warmup_steps": 1}


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", **body}, timeout=120)


def test_a_request_runs_with_its_cache_and_the_next_without(image_server):
    stack = image_server.pipe.components["transformer"]
    r = post(image_server, {"cache": SKIPPING, "num_inference_steps": 3})
    assert r.status_code == 200, r.text
    assert stack.cache is not None and stack.cache.kind == "fbcache"
    assert stack.cache.describe()["skipped_steps"] == [1, 2]
    r = post(image_server, {"cache": "none"})
    assert r.status_code == 200 and stack.cache is None
    assert post(image_server, {"cache": "teacache"}).status_code == 200 and stack.cache.kind == "teacache"
    assert post(image_server, {}).status_code == 200 and stack.cache is None  # no server default here


@pytest.mark.parametrize("cache,param,fragment", [
    ("warp", "cache", "not a step cache"),
    ({"kind": "dbcache", "threshold": -1}, "cache.threshold", "from 0 to 100"),
    ({"kind": "dbcache", "fn": 3}, "cache.fn", "leaves no middle block"),
    ({"kind": "fbcache", "bn": 1}, "cache.bn", "not an option of fbcache"),
    ({"kind": "teacache", "coefficients": list(range(20))}, "cache.coefficients", "1 to 8 numbers"),
    ({"threshold": 0.1}, "cache", "needs a 'kind'"),
    (7, "cache", "must be a step cache"),
    ({f"option{i}": i for i in range(20)}, "cache", "at most 16"),
])
def test_bad_cache_fields_answer_400_naming_the_option(image_server, cache, param, fragment):
    calls = len(image_server.pipe.calls)
    r = post(image_server, {"cache": cache})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    assert len(image_server.pipe.calls) == calls  # refused before it was queued


def test_requests_with_other_cache_settings_are_not_batched_together(image_server):
    engine = image_server.engine
    jobs = [engine.prepare("image", "a cat", cache=c) for c in
            (None, "none", "dbcache", {"kind": "dbcache"}, {"kind": "dbcache", "threshold": 0.2}, SKIPPING)]
    keys = [job.key for job in jobs]
    assert keys[0] == keys[1] and keys[2] == keys[3] and len(set(keys)) == 4
    assert jobs[2].options["cache"] == CacheConfig("dbcache")
    engine.defaults["cache"] = CacheConfig("fbcache")
    try:
        assert engine.prepare("image", "a cat").options["cache"] == CacheConfig("fbcache")
        assert engine.prepare("image", "a cat", cache="none").options["cache"] is None
    finally:
        del engine.defaults["cache"]
    with pytest.raises(InvalidArgumentError) as info:
        engine.prepare("image", "a cat", cache={"kind": "dbcache", "bn": 9})
    assert info.value.field == "cache.bn"
