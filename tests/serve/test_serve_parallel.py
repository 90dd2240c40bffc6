"""``diffc serve --num-gpus N``: every request on all N ranks (CPU processes on gloo here).

In process, with a recording channel: rank 0's ParallelPipeline sends each call before running it, and
a follower replaying what was sent ends in the same state (LoRA merged, a cancelled generation stopped
at the same step); a failed collective breaks it for good. Through the real CLI: answers match one
process (fp32, 40 dB), LoRA set over HTTP applies on every rank, a killed worker gives a clear 5xx and
an unhealthy /health, shutdown stops every rank; bad flag combinations are refused naming the flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.cli.main import main
from diffc.errors import InvalidArgumentError
from diffc.lora import apply_snapshot, snapshot_of
from diffc.parallel import ParallelConfig, ParallelError
from diffc.serve.parallel import ParallelPipeline, follow, plain, rebuilt, status
from tests.helpers import psnr_uint8
from tests.serve.test_lora_routes import _decode

MIN_PSNR = 40.0
REQUEST = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2}
WORKER_ENV = {"DIFFC_CPU_THREADS": "1", "TRITON_INTERPRET": "0"}  # as tests/parallel: one thread a rank
ROOT = Path(__file__).resolve().parents[2]


class Recording:
    """A control channel without processes: records what rank 0 sends; followers answer ``answers``."""

    def __init__(self, answers: list[dict] | None = None, world: int = 2):
        self.config = ParallelConfig(world=world, ulysses=world, timeout_s=600)
        self.rank, self.ops, self.flags, self.fail_send = 0, [], [], None
        self.answers = answers

    def send(self, op):
        if self.fail_send is not None:
            raise self.fail_send
        self.ops.append(op)

    def flag(self, value=False):
        self.flags.append(bool(value))
        return bool(value)

    def statuses(self, own):
        follower = {**status(None), "host": "elsewhere", "pid": 1}
        return [own, *(self.answers or [follower] * (self.config.world - 1))]


class Replay:
    """A follower's channel fed with what a :class:`Recording` captured, then a stop."""

    def __init__(self, recording: Recording):
        self.config, self.rank = recording.config, 1
        self.ops = [op for op in recording.ops if op["op"] != "ping"] + [{"op": "stop"}]
        self.flags, self.reports = list(recording.flags), []

    def receive(self):
        return self.ops.pop(0)

    def flag(self, value=False):
        return self.flags.pop(0)

    def statuses(self, own):
        self.reports.append(own)


def _generate(pipe, seed=3, **extra):
    out = pipe.generate(["a red fox"], seed=[seed], height=32, width=32, num_inference_steps=2, progress=False,
                        **extra)
    return np.asarray(out.images[0].convert("RGB"))


def test_followers_replaying_the_calls_end_in_rank_zeros_state(demo_ckpt, lora_file):
    channel = Recording()
    leader = ParallelPipeline(channel).attach(diffc.load(demo_ckpt("flux"), device="cpu"))
    follower = diffc.load(demo_ckpt("flux"), device="cpu")
    try:
        leader.lora.load("a", str(lora_file), ["transformer"])
        leader.set_lora("a", None, 0.5)
        merged = snapshot_of(leader)
        _generate(leader, step_callback=lambda done, total: None)
        apply_snapshot(leader, ())  # as the engine does for a batch naming no adapter
        with pytest.raises(RuntimeError, match="cancelled"):
            def cancel(done, total):
                raise RuntimeError("cancelled")
            _generate(leader, step_callback=cancel)
    finally:
        leader.close()
    sent = [(op["op"], op.get("method")) for op in channel.ops if op["op"] != "ping"]
    assert sent == [("lora", "load"), ("lora", "set"), ("generate", None), ("lora", "restore"), ("generate", None),
                    ("stop", None)]
    assert channel.flags == [False, False, True]  # two steps, then the cancel at the first step
    assert channel.ops[2]["kwargs"]["seed"] == [3] and "step_callback" not in channel.ops[2]["kwargs"]
    replay = Replay(channel)
    calls = []
    original = follower.generate
    follower.generate = lambda *a, **k: calls.append(k) or original(*a, **k)
    assert follow(follower, replay) == 0
    assert [r["ok"] for r in replay.reports] == [True] * 5  # the stopped generation is not a failure
    assert len(calls) == 2 and replay.flags == []  # every flag consumed: the ranks stopped at the same step
    assert snapshot_of(follower) == snapshot_of(leader.__dict__["_pipe"]) == tuple((c, ()) for c, _ in merged)
    follower.lora.restore(merged)
    assert follower.lora.describe()["merged"] == {"transformer": [{"nickname": "a", "strength": 0.5}]}


def test_a_failed_collective_or_a_diverged_worker_breaks_it_for_good(demo_ckpt):
    pipe = diffc.load(demo_ckpt("flux"), device="cpu")
    broken = []
    channel = Recording()
    leader = ParallelPipeline(channel, on_broken=broken.append).attach(pipe)
    channel.fail_send = ParallelError("sending: Connection closed by peer")
    with pytest.raises(ParallelError, match="Connection closed by peer.*--parallel-timeout 600 s.*restart"):
        _generate(leader)
    channel.fail_send = None
    with pytest.raises(ParallelError) as again:  # nothing is sent any more
        leader.lora.unmerge()
    assert again.value is broken[0] and len(broken) == 1 and channel.ops == []

    channel = Recording()
    leader = ParallelPipeline(channel, on_broken=broken.append).attach(pipe)
    channel.answers = [status(ValueError("disk full"))]
    with pytest.raises(ParallelError, match=r"worker rank 1 failed \(ValueError: disk full\) where rank 0 did not "
                                            "on 'lora': the ranks' weights may differ"):
        leader.lora.unmerge()
    assert len(broken) == 2

    channel = Recording()
    leader = ParallelPipeline(channel, on_broken=broken.append).attach(pipe)
    with pytest.raises(InvalidArgumentError):  # a bad request is refused on rank 0 before anything is sent
        leader.generate("x", height=32, width=32, num_inference_steps=0)
    channel.answers = [status(ParallelError("rank 1: a collective timed out"))]
    with pytest.raises(ParallelError, match="worker rank 1: ParallelError: rank 1: a collective timed out"):
        _generate(leader)
    assert [op["op"] for op in channel.ops] == ["generate"] and len(broken) == 3


def test_only_plain_data_crosses_ranks():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    sent = plain({"prompt": ["a"], "image": [image], "path": Path("/x")}, "request")
    assert sent["path"] == "/x" and isinstance(sent["image"][0]["__diffc_image__"], np.ndarray)
    back = rebuilt(sent)["image"][0]
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(image))
    with pytest.raises(TypeError, match=r"request.cache: object values cannot be sent"):
        plain({"cache": object()}, "request")
    with pytest.raises(AttributeError, match="forwards only"):
        ParallelPipeline(Recording()).compile


@pytest.mark.parametrize("flags, message", [
    (["--num-gpus", "2", "--cache", "fbcache"], "--cache: the step cache decides per rank"),
    (["--num-gpus", "2", "--offload", "layerwise"], "--offload: 'layerwise' offload with --num-gpus"),
    (["--num-gpus", "2", "--ulysses-degree", "3"], "valid with 2"),
    (["--num-gpus", "3", "--enable-cfg-parallel"], "--enable-cfg-parallel: needs an even number of GPUs"),
    (["--ring-degree", "2"], "--ring-degree: needs --num-gpus N"),
])
def test_bad_flag_combinations_are_refused(flags, message, capsys):
    assert main(["serve", "--device", "cpu", "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err


def test_groups_need_n_times_d_gpus(monkeypatch):
    import torch

    from diffc.cli.parallel import check_devices
    from diffc.parallel import resolve

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert check_devices(resolve(2), "cuda", 1) == "cuda"
    with pytest.raises(InvalidArgumentError, match=r"--num-gpus: 2 x --data-parallel 2 = 4 GPUs needed, 3 visible"):
        check_devices(resolve(2), "cuda", 2)


def test_num_gpus_1_is_plain_serve():
    from diffc.cli.main import build_parser
    from diffc.cli.parallel import parallel_config

    args = build_parser().parse_args(["serve", "--num-gpus", "1"])
    assert parallel_config(args) is None


# ---- the real command: spawned ranks, HTTP on a free port ------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(demo_ckpt, tmp_path, *flags) -> tuple[subprocess.Popen, str]:
    demo_ckpt("flux")
    port = _free_port()
    env = {**os.environ, **WORKER_ENV, "DIFFC_CACHE": str(demo_ckpt.cache)}
    proc = subprocess.Popen([sys.executable, "-m", "diffc", "serve", "--device", "cpu", "--port", str(port),
                             "--output-dir", str(tmp_path / "out"), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became healthy"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _ranks(parent: int) -> list[int]:
    """The spawned ranks of ``parent`` in start order (rank 0 first; the resource tracker left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if ppid == parent and spawned:
                found.append(int(entry.name))
    return sorted(found)


def test_served_on_two_ranks_matches_one_process_with_and_without_lora(demo_ckpt, lora_file, tmp_path):
    pipe = diffc.load(demo_ckpt("flux"), device="cpu")
    want = [_generate(pipe, seed) for seed in (3, 4)]
    pipe.set_lora("a", lora_file)
    want_lora = _generate(pipe, 3)
    assert psnr_uint8(want_lora, want[0]) < 30  # the adapter changes the picture
    proc, url = _start(demo_ckpt, tmp_path, "--num-gpus", "2", "--ulysses-degree", "2",
                       "--lora-dir", str(lora_file.parent))
    ranks = _ranks(proc.pid)
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["parallel"] == "2 processes: cfg 1 x ulysses 2 x ring 1", health
        one = httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": 3}, timeout=120)
        assert one.status_code == 200, one.text
        assert psnr_uint8(_decode(one.json()), want[0]) >= MIN_PSNR
        two = httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": 3, "n": 2}, timeout=120)
        assert two.status_code == 200, two.text
        for item, expected in zip(two.json()["data"], want):
            assert psnr_uint8(_decode({"data": [item]}), expected) >= MIN_PSNR
        r = httpx.post(f"{url}/v1/set_lora", json={"lora_nickname": "a", "lora_path": str(lora_file)}, timeout=120)
        assert r.status_code == 200, r.text
        lora = _decode(httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": 3}, timeout=120).json())
        assert psnr_uint8(lora, want_lora) >= MIN_PSNR  # merged on every rank
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "starting 2 processes: cfg 1 x ulysses 2 x ring 1 on cpu" in err
    assert "diffc serve: shut down (3 completed, 0 failed" in err, err
    assert len(ranks) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in ranks)


def test_a_killed_worker_fails_requests_clearly_and_health_says_so(demo_ckpt, tmp_path):
    proc, url = _start(demo_ckpt, tmp_path, "--num-gpus", "2", "--enable-cfg-parallel", "--parallel-timeout", "20")
    try:
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        r = httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": 1}, timeout=60)
        assert r.status_code in (500, 503), r.text
        assert f"worker rank 1 (pid {ranks[1]}) has exited" in r.json()["error"]["message"], r.text
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed", health.text
        assert "worker rank 1" in health.json()["message"] and "restart the server" in health.json()["message"]
    finally:
        err = _stop(proc)
    assert proc.returncode == 2, err
    assert "diffc serve: worker rank 1 exited with code -9" in err, err
    assert "error: the server stopped after a failure: worker rank 1" in err, err
    assert not Path(f"/proc/{ranks[0]}").exists()


def _cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_two_groups_of_two_ranks_answer_concurrent_requests_like_one_process(demo_ckpt, lora_file, tmp_path):
    import concurrent.futures

    pipe = diffc.load(demo_ckpt("flux"), device="cpu")
    want = {seed: _generate(pipe, seed) for seed in (3, 4)}
    pipe.set_lora("a", lora_file)
    want_lora = {seed: _generate(pipe, seed) for seed in (3, 4)}
    proc, url = _start(demo_ckpt, tmp_path, "--num-gpus", "2", "--ulysses-degree", "2", "--data-parallel", "2",
                       "--max-batch", "1", "--lora-dir", str(lora_file.parent))
    ranks = _ranks(proc.pid)
    try:
        assert len(ranks) == 4, ranks
        health = httpx.get(f"{url}/health").json()
        assert health["replicas"] == 2, health
        assert health["parallel"] == "2 groups of 2 processes: cfg 1 x ulysses 2 x ring 1", health
        idle = [_cpu_s(pid) for pid in ranks]

        def post(seed):
            return httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": seed}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = dict(zip((3, 4), pool.map(post, (3, 4))))
        busy = [_cpu_s(pid) - before for pid, before in zip(ranks, idle)]
        for seed, r in answers.items():
            assert r.status_code == 200, r.text
            assert psnr_uint8(_decode(r.json()), want[seed]) >= MIN_PSNR
        assert min(busy) > 0.05, busy  # both groups generated (one request each: --max-batch 1)
        # an adapter set over HTTP (loaded by replica 0) is merged by whichever group runs a request
        r = httpx.post(f"{url}/v1/set_lora", json={"lora_nickname": "a", "lora_path": str(lora_file)}, timeout=120)
        assert r.status_code == 200, r.text
        for _ in range(2):  # four requests, two at a time: each group serves some
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = dict(zip((3, 4), pool.map(post, (3, 4))))
            for seed, r in answers.items():
                assert r.status_code == 200, r.text
                assert psnr_uint8(_decode(r.json()), want_lora[seed]) >= MIN_PSNR
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "starting 2 groups of 2 processes: cfg 1 x ulysses 2 x ring 1 on cpu" in err
    assert "diffc serve: shut down (6 completed, 0 failed" in err, err
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)


def test_a_killed_rank_of_another_group_makes_the_server_unhealthy_naming_it(demo_ckpt, tmp_path):
    # 20 s, as the test above: with 8 s, a rank done loading timed out waiting for its group's leader still loading
    # (four ranks on a 2-core CI machine)
    proc, url = _start(demo_ckpt, tmp_path, "--num-gpus", "2", "--enable-cfg-parallel", "--data-parallel", "2",
                       "--parallel-timeout", "20")
    ranks = _ranks(proc.pid)
    try:
        assert len(ranks) == 4, ranks
        os.kill(ranks[3], signal.SIGKILL)
        deadline = time.monotonic() + 45  # group 1's heartbeat (2 s) notices, then rank 0's ping to its leader
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "the dead rank was never noticed"
            time.sleep(0.5)
        assert health.status_code == 503 and health.json()["status"] == "failed", health.text
        message = health.json()["message"]
        assert f"replica 1 (ranks 2..3): worker rank 3 (pid {ranks[3]}) has exited" in message, message
        r = httpx.post(f"{url}/v1/images/generations", json={**REQUEST, "seed": 1}, timeout=60)
        assert r.status_code == 503 and "worker rank 3" in r.text, r.text
    finally:
        err = _stop(proc)
    assert proc.returncode == 2, err
    assert "diffc serve: worker rank 3 exited with code -9" in err, err
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)
