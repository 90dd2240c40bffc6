"""``--api-key`` guards every /v1 route; outputs live under random ids in the server's own directory."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def keyed_server(demo_ckpt, tmp_path_factory):
    import diffc
    from diffc.serve.engine import Engine
    from tests.serve.conftest import IMAGE_DEFAULTS, LiveServer

    engine = Engine(lambda: diffc.load(demo_ckpt("flux"), device="cpu"), model_id="demo-flux",
                    defaults=IMAGE_DEFAULTS, warmup=None, output_dir=tmp_path_factory.mktemp("keyed"))
    server = LiveServer(engine, api_key=KEY).start()
    yield server
    server.stop()


def _v1_routes(app):
    """Every /v1 path and method, from the app's OpenAPI schema, with placeholder ids filled in."""
    for template, methods in app.openapi()["paths"].items():
        if template.startswith("/v1"):
            path = re.sub(r"\{(\w+)\}", lambda m: "demo-flux" if m.group(1) == "model_id" else "video_" + "0" * 32,
                          template)
            for method in methods:
                yield method.upper(), path


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_every_v1_route_needs_the_key(keyed_server, headers):
    routes = list(_v1_routes(keyed_server.app))
    assert len(routes) >= 9
    for method, path in routes:
        r = httpx.request(method, f"{keyed_server.url}{path}", headers=headers, json={"prompt": "x"})
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
        if method == "HEAD":  # no body
            continue
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_health_and_metrics_are_open(keyed_server):
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 200


def test_openai_client_with_the_key(keyed_server):
    client = keyed_server.client(api_key=KEY)
    assert [m.id for m in client.models.list()] == ["demo-flux"]
    result = client.images.generate(prompt="a key", size="32x32", response_format="url", extra_body={"seed": 1})
    url = result.data[0].url
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()


def test_outputs_have_random_ids_in_the_server_directory(keyed_server):
    client = keyed_server.client(api_key=KEY)
    result = client.images.generate(prompt="ids", size="32x32", n=2, response_format="url", extra_body={"seed": 2})
    ids = [d.url.split("/")[-2] for d in result.data]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"img_[0-9a-f]{32}", i) for i in ids)
    root = keyed_server.engine.store.root
    for i in ids:
        path = keyed_server.engine.store.get(i)
        assert path.parent == root and path.name == f"{i}.png"
