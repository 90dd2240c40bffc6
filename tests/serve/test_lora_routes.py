"""LoRA over HTTP: set/merge/unmerge/list, the --lora-dir policy, and per-request adapters that never leak."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from diffc.cli.main import main
from tests.helpers import psnr_uint8
from tests.lora import writers as W
from tests.serve.conftest import Flaky


def _decode(body) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


def _image(server, prompt="a red fox", seed=1, **extra):
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120, json={"prompt": prompt, "seed": seed, **extra})
    assert r.status_code == 200, r.text
    return _decode(r.json())


def _post(server, route, body=None):
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=120)


def _error(response, status, param, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


def _wait(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def lora_server(demo_ckpt, tmp_path_factory):
    """The flux demo behind ``Flaky``, LoRA files ``a`` and ``b`` in an allowed directory, one outside it."""
    import diffc
    from diffc.serve.engine import Engine, Limits
    from tests.serve.conftest import IMAGE_DEFAULTS, LiveServer

    root = tmp_path_factory.mktemp("lora-serve")
    allowed, outside = root / "loras", root / "private"
    allowed.mkdir(), outside.mkdir()
    dit = diffc.load(demo_ckpt("flux"), device="cpu").components["transformer"]
    for name, seed in (("a", 1), ("b", 2), ("secret", 3)):
        lora = W.random_lora(dit, W.linear_modules(dit, lambda n: n.startswith("transformer_blocks.")), seed=seed,
                             magnitude=0.4)
        W.write_keys(W.diffusers_with_alpha_keys(lora), (outside if name == "secret" else allowed) / f"{name}.safetensors")
    os.symlink(outside / "secret.safetensors", allowed / "link.safetensors")
    (allowed / "linked-folder").mkdir()  # a folder whose LoRA file links outside
    os.symlink(outside / "secret.safetensors", allowed / "linked-folder" / "pytorch_lora_weights.safetensors")
    holder = {}

    def load():
        holder["pipe"] = Flaky(diffc.load(demo_ckpt("flux"), device="cpu"))
        return holder["pipe"]

    engine = Engine(load, model_id="demo-flux", defaults=IMAGE_DEFAULTS, warmup={}, limits=Limits(max_batch=4),
                    output_dir=root / "out")
    server = LiveServer(engine, lora_dirs=[allowed], max_loras=3).start()
    server.pipe, server.allowed, server.outside = holder["pipe"], allowed, outside
    yield server
    server.stop()


def test_set_merge_unmerge_list(lora_server):
    s = lora_server
    base = _image(s)
    r = _post(s, "set_lora", {"lora_nickname": "a", "lora_path": str(s.allowed / "a.safetensors"), "strength": 0.9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["warnings"] == [] and body["active"]["transformer"][0] == {
        "nickname": "a", "path": str(s.allowed / "a.safetensors"), "strength": 0.9, "merged": True}
    with_a = _image(s)
    assert psnr_uint8(with_a, base) < 30
    assert _post(s, "unmerge_lora_weights").json()["active"]["transformer"][0]["merged"] is False
    assert np.array_equal(_image(s), base)
    assert _post(s, "merge_lora_weights", {"strength": 0.9}).status_code == 200
    assert np.array_equal(_image(s), with_a)
    listed = httpx.get(f"{s.url}/v1/list_loras").json()
    assert [a["nickname"] for a in listed["loaded_adapters"]] == ["a"] and listed["loaded_adapters"][0]["format"]
    r = _post(s, "set_lora", {"lora_nickname": ["a", "b"], "lora_path": [None, str(s.allowed / "b.safetensors")],
                              "strength": [0.5, 1.0], "target": "all"})
    assert [x["nickname"] for x in r.json()["active"]["transformer"]] == ["a", "b"]
    assert _post(s, "unmerge_lora_weights", {"target": "all"}).status_code == 200
    assert np.array_equal(_image(s), base)


@pytest.mark.parametrize("path", ["private/secret.safetensors", "loras/../private/secret.safetensors",
                                  "loras/link.safetensors", "/etc/passwd",
                                  "loras/linked-folder"])  # found by an audit: the folder form read the link
def test_paths_outside_the_lora_dirs_are_forbidden(lora_server, path):
    root = lora_server.allowed.parent
    full = path if path.startswith("/") else str(root / path)
    r = _post(lora_server, "set_lora", {"lora_nickname": "x", "lora_path": full})
    error = _error(r, 403, "lora_path", "lora_path_forbidden")
    assert error["type"] == "permission_error"
    assert "x" not in [a["nickname"] for a in httpx.get(f"{lora_server.url}/v1/list_loras").json()["loaded_adapters"]]


@pytest.mark.parametrize("body,status,param,code", [
    ({"lora_nickname": "new"}, 400, "lora_path", "invalid_value"),
    ({"lora_nickname": "a", "lora_path": "LORAS/missing.safetensors"}, 400, "lora_path", "invalid_value"),
    ({"lora_nickname": "a", "lora_path": "LORAS/a.safetensors", "strength": "high"}, 400, "strength", "invalid_value"),
    ({"lora_nickname": "a", "lora_path": "LORAS/a.safetensors", "strength": True}, 400, "strength", "invalid_value"),
    ({"lora_nickname": "a", "lora_path": "LORAS/a.safetensors", "target": "transformer_2"}, 400, "target",
     "invalid_value"),
    ({"lora_nickname": ["a", "b"], "lora_path": ["LORAS/a.safetensors"]}, 400, "lora_path", "invalid_value"),
    ({"lora_nickname": "a", "unknown": 1}, 400, "unknown", "unknown_parameter"),
    ({"lora_nickname": "a", "lora_path": "LORAS/a\u0000.safetensors"}, 400, "lora_path", "invalid_value"),  # was a 500
    ({"lora_nickname": "a", "lora_path": "LORAS/" + "x" * 300}, 400, "lora_path", "invalid_value"),  # name too long: 500
    ({"lora_nickname": "a", "lora_path": "LORAS/" + "x" * 300 + "/a.safetensors"}, 400, "lora_path", "invalid_value"),
    ({"lora_path": "LORAS/a.safetensors"}, 400, "lora_nickname", "missing_required_parameter"),
    ({"lora_nickname": ["p", "q", "r"], "lora_path": ["LORAS/a.safetensors"] * 3}, 400, "lora_nickname",
     "too_many_loras"),
])
def test_set_lora_errors(lora_server, body, status, param, code):
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v.replace("LORAS", str(lora_server.allowed)) if isinstance(v, str) else v

    _error(_post(lora_server, "set_lora", {k: fix(v) for k, v in body.items()}), status, param, code)


def test_a_relative_lora_path_is_found_in_the_lora_dirs(lora_server):
    """It was resolved in the server's working directory, which no client knows: a 403 'outside --lora-dir'."""
    r = _post(lora_server, "set_lora", {"lora_nickname": "b", "lora_path": "b.safetensors", "strength": 0.5})
    assert r.status_code == 200, r.text
    [rel] = [a for a in r.json()["loaded_adapters"] if a["nickname"] == "b"]
    assert rel["path"] == str(lora_server.allowed / "b.safetensors")
    for path in ("../private/secret.safetensors", "link.safetensors", "linked-folder"):  # still only inside
        _error(_post(lora_server, "set_lora", {"lora_nickname": "x", "lora_path": path}), 403, "lora_path",
               "lora_path_forbidden")
    error = _error(_post(lora_server, "set_lora", {"lora_nickname": "b", "lora_path": "missing.safetensors"}), 400,
                   "lora_path", "invalid_value")
    assert "missing.safetensors" in error["message"]
    assert _post(lora_server, "unmerge_lora_weights", {"target": None}).status_code == 200  # null: all (was a 400)
    assert _post(lora_server, "merge_lora_weights", {"target": None, "strength": None}).status_code == 200
    assert _post(lora_server, "set_lora", {"lora_nickname": [], "lora_path": []}).status_code == 400
    assert _post(lora_server, "unmerge_lora_weights", {"target": None}).status_code == 200


def test_bad_files_in_an_allowed_dir_are_a_400(lora_server):
    bad = lora_server.allowed / "bad.safetensors"
    bad.write_bytes(b"garbage")
    try:
        _error(_post(lora_server, "set_lora", {"lora_nickname": "bad", "lora_path": str(bad)}), 400, "lora_path",
               "invalid_lora")
    finally:
        bad.unlink()


def test_interleaved_clients_with_different_loras_get_what_they_get_alone(lora_server):
    s, engine, pipe = lora_server, lora_server.engine, lora_server.pipe
    for name in ("a", "b"):
        assert _post(s, "set_lora", {"lora_nickname": name, "lora_path": str(s.allowed / f"{name}.safetensors")}).status_code == 200
    assert _post(s, "unmerge_lora_weights").status_code == 200  # requests naming no LoRA get the base model
    alone = {"a": _image(s, seed=5, lora="a"), "b": _image(s, seed=5, lora="b", lora_strength=0.7),
             "": _image(s, seed=5)}
    assert psnr_uint8(alone["a"], alone["b"]) < 30 and psnr_uint8(alone["a"], alone[""]) < 30
    batches = engine.counters.batches
    pipe.gate.clear()
    extra = {"a": {"lora": "a"}, "b": {"lora": "b", "lora_strength": 0.7}, "": {}}
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        blocker = pool.submit(_image, s, "blocker")
        _wait(lambda: engine._running)
        futures = []
        for i, name in enumerate(["a", "b", "", "a", "b"]):
            futures.append((name, pool.submit(_image, s, seed=5, **extra[name])))
            _wait(lambda: engine.queue_depth == i + 1)
        pipe.gate.set()
        results = [(name, f.result(120)) for name, f in futures]
        blocker.result(120)
    for name, image in results:
        assert psnr_uint8(image, alone[name]) >= 40, name
    assert engine.counters.batches == batches + 4  # the blocker, then one batch per adapter set (a, b, base)
    _error(httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "lora": "nope"}), 400, "lora",
           "invalid_value")
    _error(httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "lora_strength": 2}), 400,
           "lora_strength", "invalid_value")
    _error(httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "lora": ["a", "a"]}), 400, "lora",
           "invalid_value")  # was merged twice (double strength); set_lora refuses it too
    assert np.array_equal(_image(s, seed=5), alone[""])


def test_serve_flag_errors_exit_before_starting(capsys, tmp_path):
    assert main(["serve", "--lora-strength", "0.5"]) == 2
    assert "--lora-strength: applies to the adapters of --lora-path" in capsys.readouterr().err
    assert main(["serve", "--lora-dir", str(tmp_path / "none")]) == 2
    assert "--lora-dir: not a directory" in capsys.readouterr().err


def test_concurrent_set_lora_requests_cannot_pass_max_loras(serve, lora_file, monkeypatch):
    """Found by an audit: the --max-loras count was checked before each request's (slow) load, so requests loading
    at the same time all passed it."""
    server = serve(app={"lora_dirs": [lora_file.parent], "max_loras": 1})
    manager = server.engine.pipe.lora
    load = manager.load

    def slow_load(*args, **kwargs):
        time.sleep(0.3)
        return load(*args, **kwargs)

    monkeypatch.setattr(manager, "load", slow_load)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda name: _post(server, "set_lora", {"lora_nickname": name,
                                                                         "lora_path": str(lora_file)}), ["x", "y"]))
    assert sorted(r.status_code for r in answers) == [200, 400]
    assert [r.json()["error"]["code"] for r in answers if r.status_code == 400] == ["too_many_loras"]
    assert len(manager.adapters) == 1
