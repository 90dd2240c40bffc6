"""``diffc serve`` as a user starts it: the demo model, the demo notice, the API key from the environment, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from diffc.cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_demo_subprocess(demo_ckpt, tmp_path):
    demo_ckpt("flux")  # build it once, outside the timed start-up
    port = _free_port()
    env = {**os.environ, "DIFFC_CACHE": str(demo_ckpt.cache), "DIFFC_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffc", "serve", "--port", str(port), "--no-warmup",
                             "--output-dir", str(tmp_path / "out")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": "Bearer k1"}, timeout=60,
                       json={"prompt": "a calico cat playing piano", "size": "32x32", "num_inference_steps": 1})
        assert r.status_code == 200 and r.json()["model"] == "diffc-demo-flux"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "RANDOM weights" in err and "--model" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_model_that_fails_to_load_stops_the_server(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert main(["serve", "--model", str(tmp_path), "--port", str(_free_port()), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the model failed to load" in err and "component 'scheduler' is missing" in err


def test_help_lists_serve(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_missing_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve"]) == 2
    assert "pip install 'diffc[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "{tmp}"], "model_index.json"),
    (["--task", "t2v", "--model", "{tmp}"], "--task"),
    (["--port", "70000"], "--port"),
    (["--output-ttl", "0"], "--output-ttl"),
    (["--dtype", "fp8"], "dtype"),
])
def test_serve_argument_errors(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    assert main(["serve"] + [a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert fragment in capsys.readouterr().err
