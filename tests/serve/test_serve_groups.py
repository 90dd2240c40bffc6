"""``diffc serve --num-gpus N --data-parallel D``: rank 0's proxy of another group and that group's leader.

In process, over a queue pair standing in for the gloo link (every message pickled, as gloo would): a
generation through the proxy is the leader's, step by step (progress reaches the engine's callbacks, a
cancel stops the leader at the same step), a bad request comes back as the same field error, and a lost
link or a broken group breaks the proxy for good, naming the replica. The real command, with two groups
of two CPU processes, is tested in test_serve_parallel.py.
"""

from __future__ import annotations

import pickle
import queue
import threading

import numpy as np
import pytest

import diffc
from diffc.errors import InvalidArgumentError
from diffc.parallel import ParallelConfig, ParallelError
from diffc.serve.groups import ProxyPipeline, lead

CONFIG = ParallelConfig(world=2, ulysses=2, timeout_s=60)


class QueueLink:
    """One end of a link; ``fail`` makes the next send raise it."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, leader: int = 2):
        self.inbox, self.outbox, self.leader, self.fail, self.sent = inbox, outbox, leader, None, []

    def send(self, message):
        if self.fail is not None:
            raise self.fail
        self.sent.append(message)
        self.outbox.put(pickle.dumps(message))

    def receive(self):
        try:
            return pickle.loads(self.inbox.get(timeout=60))
        except queue.Empty:  # as gloo's timeout would
            raise ParallelError("waiting for the other end: timed out") from None


class Leader:
    """``lead(pipe, link)`` on a thread, with the proxy at the other end of the link."""

    def __init__(self, pipe, broken: list | None = None):
        a, b = queue.Queue(), queue.Queue()
        self.front, self.back = QueueLink(a, b), QueueLink(b, a)
        self.pipe, self.calls, self.rc = pipe, [], None
        self.proxy = ProxyPipeline(self.front, 1, CONFIG, lambda: pipe,
                                   on_broken=None if broken is None else broken.append)
        self.proxy.heartbeat_s = 3600  # no pings in the recorded messages
        self.back.send({"ok": True, "parallel": False, "error": None, "host": "elsewhere", "pid": 1})
        self.thread = threading.Thread(target=self._lead, daemon=True)
        self.thread.start()
        self.proxy.attach()

    def _lead(self):
        self.rc = lead(self, self.back)

    def generate(self, **kwargs):  # the leader's pipeline, recording the steps it ran
        step = kwargs.pop("step_callback")

        def counted(done, total):
            self.calls.append(done)
            step(done, total)

        return self.pipe.generate(**kwargs, step_callback=counted)

    @property
    def lora(self):
        return self.pipe.lora

    def stop(self) -> int:
        self.proxy.close()
        self.thread.join(30)
        return self.rc


@pytest.fixture(scope="module")
def pipe(demo_ckpt):
    return diffc.load(demo_ckpt("flux"), device="cpu")


def _image(out):
    return np.asarray(out.images[0].convert("RGB"))


def _generate(target, **extra):
    return target.generate(["a red fox"], seed=[3], height=32, width=32, num_inference_steps=2, progress=False,
                           **extra)


def test_a_generation_through_the_proxy_is_the_leaders(pipe):
    leader = Leader(pipe)
    steps, decodes = [], []
    out = _generate(leader.proxy, step_callback=lambda d, t: steps.append((d, t)),
                    decode_callback=lambda d, t: decodes.append((d, t)))
    assert np.array_equal(_image(out), _image(_generate(pipe)))  # the same process's math: identical
    assert steps == [(1, 2), (2, 2)] and leader.calls == [1, 2]  # (an image decode reports no progress)
    assert out.seeds == [3] and out.timings.total_s > 0 and set(out.timings.stages) >= {"denoise"}
    assert leader.proxy.spec is pipe.spec  # reads are the local replica's
    assert leader.stop() == 0 and leader.back.sent[-1]["ok"]


def test_a_cancel_stops_the_leader_at_the_same_step_and_the_link_stays_in_step(pipe):
    leader = Leader(pipe)

    def cancel(done, total):
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):  # the engine's own exception, not a remote one
        _generate(leader.proxy, step_callback=cancel)
    assert leader.calls == [1] and leader.front.sent[-1] == {"stop": True}
    assert leader.proxy.error is None
    with pytest.raises(InvalidArgumentError) as bad:  # refused on the leader, rebuilt here with its field
        leader.proxy.generate("x", height=32, width=32, num_inference_steps=0, progress=False)
    assert bad.value.field == "num_inference_steps"
    assert _generate(leader.proxy).images  # still in step
    assert leader.stop() == 0


def test_a_lost_link_or_a_broken_group_breaks_the_proxy_for_good(pipe):
    broken = []
    leader = Leader(pipe, broken)
    leader.front.fail = ParallelError("sending to rank 2: Connection closed by peer")
    with pytest.raises(ParallelError, match=r"replica 1 \(ranks 2..3\): sending to rank 2: Connection closed.*"
                                            r"--parallel-timeout 60 s.*restart the server"):
        _generate(leader.proxy)
    leader.front.fail = None
    with pytest.raises(ParallelError) as again:  # nothing is sent any more
        _generate(leader.proxy)
    assert again.value is broken[0] and len(broken) == 1
    leader.front.outbox.put(pickle.dumps({"op": "stop"}))  # a broken proxy sends nothing, even at close
    leader.proxy.close()
    leader.thread.join(30)
    assert leader.rc == 0

    class Dead:
        def generate(self, **kwargs):
            raise ParallelError("worker rank 3 (pid 9) has exited; ... restart the server")

    leader = Leader(Dead(), broken)
    with pytest.raises(ParallelError, match=r"replica 1 \(ranks 2..3\): .*worker rank 3 \(pid 9\) has exited"):
        _generate(leader.proxy)
    assert len(broken) == 2
    leader.proxy.error = None  # let close() reach the leader thread
    assert leader.stop() == 0


def test_the_leader_loads_the_adapters_a_batch_names_from_replica_zeros_cache(demo_ckpt, lora_file):
    """An adapter set over HTTP lives in replica 0's cache; restoring a batch's LoRA state on another group makes
    its leader load the file first, once, and merge it: the group's pixels are replica 0's."""
    from diffc.lora import apply_snapshot, snapshot_of

    front, group = diffc.load(demo_ckpt("flux"), device="cpu"), diffc.load(demo_ckpt("flux"), device="cpu")
    front.set_lora("a", lora_file, strength=0.8)
    leader = Leader(group)
    leader.proxy.reference = lambda: front
    try:
        for _ in range(2):
            apply_snapshot(leader.proxy, snapshot_of(front))
            assert np.array_equal(_image(_generate(leader.proxy)), _image(_generate(front)))
        ops = [(m["op"], m.get("method")) for m in leader.front.sent if isinstance(m, dict) and "op" in m]
        assert ops.count(("lora", "load")) == 1 and ops.count(("lora", "restore")) == 2
        assert group.lora.adapters["a"].path == front.lora.adapters["a"].path
        apply_snapshot(leader.proxy, ())  # a request without adapters: the group's original weights
        front.unmerge_lora_weights()
        assert np.array_equal(_image(_generate(leader.proxy)), _image(_generate(front)))
    finally:
        assert leader.stop() == 0
