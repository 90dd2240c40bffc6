"""Live servers for the serve tests: uvicorn in a thread, on a free port of 127.0.0.1, over the tiny demo models."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402

import diffc  # noqa: E402
from diffc.serve.app import create_app  # noqa: E402
from diffc.serve.engine import Engine, Limits  # noqa: E402

# Small enough for two shared CPU cores: 32x32 images, 5-frame 32x32 videos, 2 steps.
IMAGE_DEFAULTS = {"height": 32, "width": 32, "num_inference_steps": 2}
VIDEO_DEFAULTS = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
START_TIMEOUT_S = 120


class Flaky:
    """Wraps a pipeline: prompts containing 'explode' fail like a CUDA OOM, 'blocker' waits for ``gate``,
    'slow' sleeps ``step_delay_s`` at every denoising step (so a job stays in progress on any machine)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.step_delay_s = 0.05
        self.calls: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(prompts)
        if any("blocker" in p for p in prompts):
            assert self.gate.wait(60), "test gate never opened"
        if any("explode" in p for p in prompts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")
        if self.delay_s:
            time.sleep(self.delay_s)
        if any("slow" in p for p in prompts) and kwargs.get("step_callback") is not None:
            callback = kwargs["step_callback"]

            def slow_callback(done, total):
                time.sleep(self.step_delay_s)
                callback(done, total)

            kwargs["step_callback"] = slow_callback
        return self._pipe.generate(prompt, **kwargs)


class LiveServer:
    """``create_app(engine)`` served by uvicorn on a thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, engine: Engine, **app_kwargs):
        self.engine = engine
        self.app = create_app(engine, **app_kwargs)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        if wait_ready:
            assert self.engine.wait_ready(START_TIMEOUT_S), f"not ready: {self.engine.state} {self.engine.load_error}"
        return self

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"
        self.sock.close()

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory):
    """``demo_ckpt(family) -> Path``: the demo checkpoints, built once into a private cache."""
    from diffc.demo import demo_checkpoint

    cache = tmp_path_factory.mktemp("diffc-cache")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            old = os.environ.get("DIFFC_CACHE")
            os.environ["DIFFC_CACHE"] = str(cache)
            try:
                built[family] = demo_checkpoint(family)
            finally:
                if old is None:
                    os.environ.pop("DIFFC_CACHE")
                else:
                    os.environ["DIFFC_CACHE"] = old
        return built[family]

    get.cache = cache
    return get


@pytest.fixture
def serve(demo_ckpt, tmp_path):
    """``serve(family, wrap, limits, app, wait_ready, **engine_kwargs) -> LiveServer``, all optional.

    ``wrap(pipe)`` runs on the engine's thread after loading; ``limits`` and ``app`` are keyword arguments
    of ``Limits`` and ``create_app``. Every server is stopped at teardown.
    """
    servers: list[LiveServer] = []

    def start(family: str = "flux", wrap=None, limits: dict | None = None, app: dict | None = None,
              wait_ready: bool = True, **engine_kwargs):
        path = demo_ckpt(family)
        defaults = IMAGE_DEFAULTS if family == "flux" else VIDEO_DEFAULTS

        def load():
            pipe = diffc.load(path, device="cpu")
            return wrap(pipe) if wrap is not None else pipe

        engine_kwargs.setdefault("output_dir", tmp_path / f"outputs-{len(servers)}")
        engine = Engine(load, model_id=f"demo-{family}", limits=Limits(**(limits or {})), defaults=defaults,
                        warmup={}, **engine_kwargs)
        server = LiveServer(engine, **(app or {}))
        servers.append(server)
        return server.start(wait_ready)

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture(scope="module")
def image_server(demo_ckpt, tmp_path_factory):
    """One image server shared by a module: the flux demo behind ``Flaky``, default limits."""
    holder = {}

    def load():
        holder["pipe"] = Flaky(diffc.load(demo_ckpt("flux"), device="cpu"))
        return holder["pipe"]

    engine = Engine(load, model_id="demo-flux", defaults=IMAGE_DEFAULTS, warmup={},
                    output_dir=tmp_path_factory.mktemp("image-outputs"))
    server = LiveServer(engine).start()
    server.pipe = holder["pipe"]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def video_server(demo_ckpt, tmp_path_factory):
    """One video server shared by a module: the Wan demo behind ``Flaky``, at most 17 frames a request."""
    engine = Engine(lambda: Flaky(diffc.load(demo_ckpt("wan"), device="cpu")), model_id="demo-wan",
                    defaults=VIDEO_DEFAULTS,
                    warmup={}, limits=Limits(max_frames=17), output_dir=tmp_path_factory.mktemp("video-outputs"))
    server = LiveServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def i2v_server(demo_ckpt, tmp_path_factory):
    """An image-to-video server shared by a module: the Wan2.1 I2V demo, 32x32 5-frame videos."""
    engine = Engine(lambda: diffc.load(demo_ckpt("wan-i2v"), device="cpu"), model_id="demo-wan-i2v",
                    defaults=VIDEO_DEFAULTS, limits=Limits(max_frames=17),
                    output_dir=tmp_path_factory.mktemp("i2v-outputs"))
    server = LiveServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lora_file(demo_ckpt, tmp_path_factory):
    """A diffusers-format LoRA on the demo FLUX DiT's double-stream blocks that visibly changes its pictures."""
    from tests.lora import writers as W

    root = tmp_path_factory.mktemp("parallel-loras")
    dit = diffc.load(demo_ckpt("flux"), device="cpu").components["transformer"]
    lora = W.random_lora(dit, W.linear_modules(dit, lambda n: n.startswith("transformer_blocks.")), seed=1,
                         magnitude=0.4)
    W.write_keys(W.diffusers_with_alpha_keys(lora), root / "a.safetensors")
    return root / "a.safetensors"
