"""Every refused request answers in OpenAI's error format, and a failing generation fails only its own request."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

ERROR_KEYS = {"message", "type", "param", "code"}

# (body, status, param, code)
IMAGE_CASES = {
    "malformed json": (b'{"prompt": "x",', 400, None, "invalid_json"),
    "not an object": (b'["a cat"]', 400, None, "invalid_json"),
    "missing prompt": ({"size": "32x32"}, 400, "prompt", "missing_required_parameter"),
    "empty prompt": ({"prompt": ""}, 400, "prompt", "invalid_value"),
    "blank prompt": ({"prompt": "   "}, 400, "prompt", "invalid_value"),
    "unknown field": ({"prompt": "x", "num_inference_step": 2}, 400, "num_inference_step", "unknown_parameter"),
    "malformed size": ({"prompt": "x", "size": "big"}, 400, "size", "invalid_value"),
    "size the model cannot make": ({"prompt": "x", "size": "33x32"}, 400, "size", "invalid_value"),
    "size over max pixels": ({"prompt": "x", "size": "2048x2048"}, 400, "size", "invalid_value"),
    "n over max n": ({"prompt": "x", "n": 5}, 400, "n", "invalid_value"),
    "n zero": ({"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    "n not a number": ({"prompt": "x", "n": "two"}, 400, "n", "invalid_value"),
    "n a boolean": ({"prompt": "x", "n": True}, 400, "n", "invalid_value"),
    "steps over max steps": ({"prompt": "x", "num_inference_steps": 101}, 400, "num_inference_steps", "invalid_value"),
    "steps zero": ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_value"),
    "negative seed": ({"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    "guidance out of range": ({"prompt": "x", "guidance_scale": 1e9}, 400, "guidance_scale", "invalid_value"),
    "unsupported response_format": ({"prompt": "x", "response_format": "gif"}, 400, "response_format", "invalid_value"),
    "unsupported output_format": ({"prompt": "x", "output_format": "svg"}, 400, "output_format", "invalid_value"),
    "streaming": ({"prompt": "x", "stream": True}, 400, "stream", "invalid_value"),
    "transparent background": ({"prompt": "x", "background": "transparent"}, 400, "background", "invalid_value"),
    "negative prompt on flux": ({"prompt": "x", "negative_prompt": "blur"}, 400, "negative_prompt", "invalid_value"),
    "another model": ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    "quality not OpenAI's": ({"prompt": "x", "quality": "ultra"}, 400, "quality", "invalid_value"),  # was ignored
    "style not OpenAI's": ({"prompt": "x", "style": "Vivid"}, 400, "style", "invalid_value"),
    "moderation not OpenAI's": ({"prompt": "x", "moderation": "off"}, 400, "moderation", "invalid_value"),
}


def _check_error(response: httpx.Response, status: int, param, code) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_request_errors(image_server, case):
    body, status, param, code = IMAGE_CASES[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{image_server.url}/v1/images/generations", **kwargs)
    error = _check_error(r, status, param, code)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field,value", [("quality", "hd"), ("quality", "auto"), ("quality", "low"),
                                         ("style", "natural"), ("moderation", "low"), ("background", "opaque")])
def test_openai_values_diffc_ignores_are_accepted(image_server, field, value):
    r = httpx.post(f"{image_server.url}/v1/images/generations", timeout=120,
                   json={"prompt": "x", "size": "32x32", "num_inference_steps": 1, field: value})
    assert r.status_code == 200, r.text


def test_a_form_urlencoded_body_says_what_is_read(image_server):
    """``curl -d 'prompt=a'`` sends a form-urlencoded body, which the server reads as JSON: the error says so."""
    r = httpx.post(f"{image_server.url}/v1/images/generations", data={"prompt": "a cat", "size": "32x32"})
    error = _check_error(r, 400, None, "invalid_json")
    assert "application/json" in error["message"] and "multipart/form-data" in error["message"]
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=b'{"prompt": "a cat", "size": "32x32"}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d with JSON
    assert r.status_code == 200, r.text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_video_request_to_an_image_model(image_server):
    r = httpx.post(f"{image_server.url}/v1/videos", json={"prompt": "a wave"})
    error = _check_error(r, 400, "model", "model_not_supported")
    assert "image model" in error["message"] and "/v1/images/generations" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        image_server.client().videos.create(prompt="a wave")
    assert info.value.code == "model_not_supported"


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("PUT", "/v1/images/generations", 405, None),
    ("GET", "/v1/videos?limit=0", 400, "invalid_value"),
    ("GET", "/v1/videos/video_0123", 404, "not_found"),
    ("GET", "/v1/images/img_..%2F..%2Fetc%2Fpasswd/content", 404, "not_found"),
    ("GET", "/v1/images/../../../../etc/passwd/content", 404, "not_found"),
    ("DELETE", "/v1/videos/..%2Fx", 404, "not_found"),
    ("GET", "/v1/models/dall-e-3", 404, "model_not_found"),
])
def test_route_errors(image_server, method, path, status, code):
    r = httpx.request(method, f"{image_server.url}{path}")
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] == code


def test_body_size_limit(image_server):
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=big)
    error = _check_error(r, 413, None, "request_too_large")
    assert "--max-body-bytes" in error["message"]  # the operator's flag, as the other limits name theirs

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(40):
            yield b"y" * (64 << 10)

    r = httpx.post(f"{image_server.url}/v1/images/generations", content=chunks())
    _check_error(r, 413, None, "request_too_large")


def _post(server, prompt, seed):
    return httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                      json={"prompt": prompt, "size": "32x32", "seed": seed})


def _wait(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_failed_generation_fails_only_its_request(image_server):
    engine, pipe = image_server.engine, image_server.pipe
    pipe.gate.clear()
    calls_before = len(pipe.calls)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(_post, image_server, "blocker", 1)
        _wait(lambda: engine._running)
        bad = pool.submit(_post, image_server, "explode now", 2)
        _wait(lambda: engine.queue_depth == 1)
        good = pool.submit(_post, image_server, "a good one", 3)
        _wait(lambda: engine.queue_depth == 2)
        pipe.gate.set()
        bad, good, blocker = bad.result(120), good.result(120), blocker.result(120)
    error = _check_error(bad, 500, None, "out_of_memory")
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert good.status_code == 200 and blocker.status_code == 200
    calls = pipe.calls[calls_before:]
    assert ["explode now", "a good one"] in calls  # batched together, failed, then retried alone
    assert ["explode now"] in calls and ["a good one"] in calls
    assert httpx.get(f"{image_server.url}/health").status_code == 200
    assert _post(image_server, "after the failure", 4).status_code == 200
    assert 'diffc_errors_total{reason="out_of_memory"} 1.0' in httpx.get(f"{image_server.url}/metrics").text


def test_not_ready_answers_503_until_loaded_and_warmed(serve):
    import threading

    release = threading.Event()

    def slow_load(pipe):
        assert release.wait(60)
        return pipe

    server = serve(wrap=slow_load, wait_ready=False)
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "too early"})
        error = _check_error(r, 503, None, "model_not_ready")
        assert error["type"] == "server_error" and r.headers["retry-after"] == "5"
    finally:
        release.set()
    assert server.engine.wait_ready(120)
    assert httpx.get(f"{server.url}/health").status_code == 200


def _form(fields: dict[str, str], boundary: str = "diffc-test") -> tuple[bytes, dict[str, str]]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_multipart_bodies(image_server):
    """Form data is parsed by python-multipart: fields validate like JSON, broken bodies are refused."""
    url = f"{image_server.url}/v1/images/generations"
    body, headers = _form({"prompt": "a cat", "n": "9"})
    _check_error(httpx.post(url, content=body, headers=headers), 400, "n", "invalid_value")
    body, headers = _form({"prompt": "a cat", "num_inference_step": "2"})
    _check_error(httpx.post(url, content=body, headers=headers), 400, "num_inference_step", "unknown_parameter")
    body, headers = _form({"prompt": "a cat", "size": "32x32", "num_inference_steps": "1", "seed": "5"})
    r = httpx.post(url, content=body, headers=headers, timeout=120)
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 5
    broken = b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat'  # no closing boundary
    r = httpx.post(url, content=broken, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_body", "missing_required_parameter")


def test_multipart_input_reference_to_a_text_to_video_model(video_server):
    r = httpx.post(f"{video_server.url}/v1/videos", data={"prompt": "a wave"},
                   files={"input_reference": ("ref.png", b"\x89PNG....", "image/png")})
    error = _check_error(r, 400, "input_reference", "model_not_supported")
    assert "takes no input image" in error["message"]


@pytest.mark.parametrize("content", [b"", b"  \r\n"])
def test_an_empty_body_says_it_is_empty(image_server, content):
    """``curl -X POST`` with no ``-d``: the error says the body is empty, not 'Expecting value: line 1 column 1'."""
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=content,
                   headers={"content-type": "application/json"})
    error = _check_error(r, 400, None, "invalid_json")
    assert "body is empty" in error["message"] and "Expecting value" not in error["message"]


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "a cat", "size": "32x32", "prompt": "a dog"}', "prompt"),
    (b'{"prompt": "a cat", "cache": {"kind": "fbcache", "kind": "teacache"}}', "kind"),
])
def test_a_json_key_given_twice_is_refused_by_name(image_server, body, param):
    """Which of two values counts was the JSON parser's choice (the last); a proxy checking the first would
    see another request than the one generated."""
    r = httpx.post(f"{image_server.url}/v1/images/generations", content=body)
    error = _check_error(r, 400, param, "duplicate_parameter")
    assert "more than once" in error["message"]


def test_a_form_field_given_twice_is_refused_by_name(image_server):
    url = f"{image_server.url}/v1/images/generations"
    r = httpx.post(url, files=[("prompt", (None, "a cat")), ("size", (None, "32x32")), ("prompt", (None, "a dog"))])
    _check_error(r, 400, "prompt", "duplicate_parameter")
    r = httpx.post(url, files=[("prompt", (None, "a cat")), ("seed", (None, "1")), ("seed", (None, "2"))])
    _check_error(r, 400, "seed", "duplicate_parameter")


def test_an_input_image_sent_to_generations_says_where_it_goes(image_server):
    r = httpx.post(f"{image_server.url}/v1/images/generations", json={"prompt": "x", "image": "data:image/png;base64,"})
    error = _check_error(r, 400, "image", "unknown_parameter")
    assert "POST /v1/images/edits" in error["message"]
