"""``diffc serve`` as a user starts it: the demo model, the demo notice, the API key from the environment, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from diffc.cli.main import main

TEXT_TOKENS = 16  # compiled below instead of FLUX's 512: fewer rows through the interpreted kernels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 120) -> None:
    """Poll ``/health`` until the server answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became healthy"
        time.sleep(0.2)


def test_serve_demo_subprocess(demo_ckpt, tmp_path):
    demo_ckpt("flux")  # build it once, outside the timed start-up
    port = _free_port()
    env = {**os.environ, "DIFFC_CACHE": str(demo_ckpt.cache), "DIFFC_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffc", "serve", "--port", str(port), "--no-warmup",
                             "--output-dir", str(tmp_path / "out")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": "Bearer k1"}, timeout=60,
                       json={"prompt": "a calico cat playing piano", "size": "32x32", "num_inference_steps": 1})
        assert r.status_code == 200 and r.json()["model"] == "diffc-demo-flux"
        assert httpx.get(f"{url}/health", headers={"Host": "rebound.example"}).status_code == 400  # DNS rebinding
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "RANDOM weights" in err and "--model" in err
    assert list((tmp_path / "out").iterdir()) == []
    lines = err.splitlines()
    assert f"diffc serve: ready on {url} (model diffc-demo-flux)" in lines, err
    request = [line for line in lines if line.startswith("diffc serve: img_")]
    assert len(request) == 1 and " image 32x32 n=1 completed in " in request[0], err
    assert lines[-1] == "diffc serve: shut down (1 completed, 0 failed, 0 refused as the queue was full)", err


def test_a_model_that_fails_to_load_stops_the_server(demo_ckpt, tmp_path, capsys):
    """Weights are read once the server listens: a transformer config that the checks before binding do not read
    (they read model_index.json and the component folders) fails the load, which stops the server."""
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt("flux"), root)
    (root / "transformer" / "config.json").write_text('{"num_layers": "two"}')
    assert main(["serve", "--model", str(root), "--port", str(_free_port()), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the model failed to load" in err and "'num_layers': expected an integer" in err


def test_a_diffc_cache_that_is_a_file_is_one_line_with_no_traceback(tmp_path, capsys, caplog, monkeypatch):
    """Found by an audit: the demo's build in ``$DIFFC_CACHE`` (a file here) ended in a NotADirectoryError traceback."""
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cachefile"))
    assert main(["serve", "--port", str(_free_port()), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: DIFFC_CACHE: cannot build the demo model in" in err  # before the port is bound
    assert "Traceback" not in err and not any(r.exc_info for r in caplog.records)


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


def test_serve_compiled_artifact(demo_ckpt, tmp_path):
    """``diffc serve --compiled``: the checkpoint comes from the manifest, and requests without a size get
    the compiled one, and the compiled text length (the HTTP API has no field for it), so they run the compiled
    graph (checked in-process below)."""
    import diffc

    path, art = demo_ckpt("flux"), tmp_path / "art"
    diffc.load(path, device="cpu").compile([{"height": 32, "width": 48, "max_sequence_length": TEXT_TOKENS}], out=art,
                                           log=lambda line: None)
    port = _free_port()
    env = {**os.environ, "DIFFC_CACHE": str(demo_ckpt.cache)}
    proc = subprocess.Popen([sys.executable, "-m", "diffc", "serve", "--compiled", str(art), "--port", str(port),
                             "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        r = httpx.post(f"{url}/v1/images/generations", timeout=60,
                       json={"prompt": "a calico cat", "num_inference_steps": 1, "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == path.name
        assert r.json()["warnings"] == []  # no "the compiled DiT has no graph for this shape"
        import base64
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert image.size == (48, 32)  # the compiled bucket's size, since the request gave none
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "no compiled graph" not in err

    pipe = diffc.load(path, device="cpu", compiled=art)
    out = pipe.generate("a calico cat", height=32, width=48, num_inference_steps=2, max_sequence_length=TEXT_TOKENS,
                        progress=False)
    assert pipe.executor.compiled().counters.compiled_calls == 2 and out.warnings == []


def test_serve_compiled_artifact_missing(tmp_path, capsys):
    assert main(["serve", "--compiled", str(tmp_path / "nope"), "--port", str(_free_port())]) == 2
    assert "compiled artifact not found" in capsys.readouterr().err


@pytest.mark.parametrize("change,fragment", [
    ({"environment": {"torch": "0.0.0", "device_type": "cpu"}}, "compiled for another setup"),
    ({"files": {"transformer/gone.json": {"sha256": "0" * 64, "bytes": 1}}}, "is missing from the artifact"),
    ({"model_hash": "0123456789abcdef"}, "model config"),
])
def test_serve_compiled_checks_the_artifact_before_binding_its_port(demo_ckpt, tmp_path, capsys, monkeypatch, change,
                                                                     fragment):
    """An artifact for another setup, a damaged one or one for another model is refused before the port is bound
    (the manifest was read before, the rest only once uvicorn was listening)."""
    import diffc.cli.serve as cli_serve
    from diffc.compile import artifact as art
    from diffc.compile.compiler import pass_sources
    from diffc.loader.pipeline import resolve_device

    path = demo_ckpt("flux")
    env = {**art.environment(resolve_device("cpu")), **change.get("environment", {})}
    manifest = {"format_version": art.FORMAT_VERSION, "dtype": "float32", "environment": env,
                "model": {"path": str(path), "config_hash": change.get("model_hash", art.config_hash(path))},
                "passes": {"sources": pass_sources()}, "files": change.get("files", {}),
                "stages": {"transformer": {"buckets": [{"key": "k", "request": {"height": 32, "width": 32},
                                                         "regions": []}]}}}
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(manifest))
    bound = []
    monkeypatch.setattr(cli_serve, "_listen", lambda *a: bound.append(a) or pytest.fail("the port was bound"))
    assert main(["serve", "--compiled", str(tmp_path / "art"), "--device", "cpu", "--port", str(_free_port())]) == 2
    assert fragment in capsys.readouterr().err and bound == []


@pytest.mark.parametrize("damage,fragment", [
    (lambda root: __import__("shutil").rmtree(root / "vae"), "missing folder: "),
    (lambda root: _edit_index(root, scheduler=None), "component 'scheduler' is missing or empty"),
    (lambda root: _edit_index(root, vae=["diffusers", "NoSuchAutoencoder"]), "unknown class 'NoSuchAutoencoder'"),
])
def test_serve_checks_the_checkpoint_before_binding_its_port(demo_ckpt, tmp_path, capsys, monkeypatch, damage,
                                                            fragment):
    """A checkpoint short of a component folder, or naming one diffc does not load, is refused before the port is
    bound (it was found only once the server was listening, loading in the background)."""
    import shutil

    import diffc.cli.serve as cli_serve

    root = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt("flux"), root)
    damage(root)
    monkeypatch.setattr(cli_serve, "_listen", lambda *a: pytest.fail("the port was bound"))
    assert main(["serve", "--model", str(root), "--device", "cpu", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def _edit_index(root, **entries) -> None:
    index = json.loads((root / "model_index.json").read_text())
    index.update(entries)
    (root / "model_index.json").write_text(json.dumps(index))
