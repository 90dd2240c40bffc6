"""``diffc serve --data-parallel D``: D replicas of the pipeline behind one queue and one HTTP front. Requests
spread over the replicas, each answer is what one pipeline gives, LoRA state follows every batch onto the
replica that runs it, and a replica that cannot load fails the server with its error."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import numpy as np
import pytest

import diffc
from diffc.serve.engine import Engine, Limits
from tests.lora import writers as W
from tests.serve.conftest import IMAGE_DEFAULTS, Flaky, LiveServer
from tests.serve.test_lora_routes import _decode, _post

SLOW = "slow fox"  # Flaky sleeps at every step of a 'slow' prompt, so both replicas get work


class Recorder(Flaky):
    """Records which engine thread (replica) ran each generation."""

    def __init__(self, pipe, seen: list):
        super().__init__(pipe)
        self.seen = seen
        self.step_delay_s = 0.1

    def generate(self, prompt, **kwargs):
        if kwargs.get("step_callback") is not None:  # not the warm-up
            self.seen.append(threading.current_thread().name)
        return super().generate(prompt, **kwargs)


@pytest.fixture(scope="module")
def dp_server(demo_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-parallel")
    allowed = root / "loras"
    allowed.mkdir()
    dit = diffc.load(demo_ckpt("flux"), device="cpu").components["transformer"]
    lora = W.random_lora(dit, W.linear_modules(dit, lambda n: n.startswith("transformer_blocks.")), seed=1,
                         magnitude=0.4)
    W.write_keys(W.diffusers_with_alpha_keys(lora), allowed / "a.safetensors")
    seen: list[str] = []

    def load():
        return Recorder(diffc.load(demo_ckpt("flux"), device="cpu"), seen)

    engine = Engine(load, replicas=[load], model_id="demo-flux", defaults=IMAGE_DEFAULTS, warmup={},
                    limits=Limits(max_batch=1), output_dir=root / "out")
    server = LiveServer(engine, lora_dirs=[allowed]).start()
    server.seen, server.allowed = seen, allowed
    yield server
    server.stop()


def _images(server, seeds, prompt=SLOW, **extra):
    def one(seed):
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": prompt, "seed": seed, **extra})
        assert r.status_code == 200, r.text
        return _decode(r.json())

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(one, seeds))


def test_requests_spread_over_replicas_with_one_pipelines_answers(dp_server):
    assert dp_server.engine.replicas == 2
    assert httpx.get(f"{dp_server.url}/health").json()["replicas"] == 2
    dp_server.seen.clear()
    images = _images(dp_server, [1, 1, 2, 2])
    assert {"diffc-engine", "diffc-engine-1"} <= set(dp_server.seen), dp_server.seen
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[2], images[3])  # replicas agree
    assert not np.array_equal(images[0], images[2])


def test_lora_state_follows_each_batch_onto_its_replica(dp_server):
    base = _images(dp_server, [3, 3])
    r = _post(dp_server, "set_lora", {"lora_nickname": "a", "lora_path": str(dp_server.allowed / "a.safetensors")})
    assert r.status_code == 200, r.text
    dp_server.seen.clear()
    merged = _images(dp_server, [3, 3, 3, 3])
    assert {"diffc-engine", "diffc-engine-1"} <= set(dp_server.seen), dp_server.seen
    assert all(np.array_equal(m, merged[0]) for m in merged) and not np.array_equal(merged[0], base[0])
    assert _post(dp_server, "unmerge_lora_weights").status_code == 200
    again = _images(dp_server, [3, 3, 3])
    assert all(np.array_equal(a, base[0]) for a in again)
    # a request naming the cached adapter gets it on whichever replica runs it, its neighbours do not
    mixed = _images(dp_server, [3, 3], lora="a")
    assert all(np.array_equal(m, merged[0]) for m in mixed)


def test_a_replica_that_cannot_load_fails_the_server(demo_ckpt, tmp_path):
    fatal = []

    def broken():
        raise RuntimeError("CUDA error: no device for replica 1")

    engine = Engine(lambda: diffc.load(demo_ckpt("flux"), device="cpu"), replicas=[broken], model_id="demo-flux",
                    defaults=IMAGE_DEFAULTS, warmup=None, output_dir=tmp_path / "out", on_fatal=fatal.append)
    engine.start()
    assert not engine.wait_ready(60)
    assert engine.state == "failed" and "replica 1" in str(engine.load_error) and len(fatal) == 1
    assert "failed to load" in engine.not_ready_message()
    engine.shutdown(5)


def test_cli_refuses_more_replicas_than_gpus():
    import torch

    from diffc.cli.serve import replica_devices
    from diffc.errors import InvalidArgumentError

    assert replica_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3
    if torch.cuda.device_count() < 64:
        with pytest.raises(InvalidArgumentError, match="--data-parallel: 64 replicas need GPUs cuda:0..cuda:63"):
            replica_devices(torch.device("cuda"), 64)
