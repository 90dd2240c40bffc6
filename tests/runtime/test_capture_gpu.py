"""diffc.capture on a GPU: a capture restricts its own thread only, so another thread (a server's other replica or
its HTTP thread) allocates while a graph is being captured; a failed capture is undone.

Run with ``python -m pytest tests/runtime/test_capture_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import threading

import pytest
import torch

from diffc.capture import capture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_another_thread_allocates_while_a_graph_captures():
    device = torch.device("cuda")
    capturing, allocated = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def other_thread():
        capturing.wait(10)
        try:
            block = torch.empty(64 << 20, dtype=torch.uint8, device=device)  # a new 64 MiB block: cudaMalloc
            block.fill_(1)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
        finally:
            allocated.set()

    def forward():
        y = torch.ones(8, device=device) * 2
        capturing.set()
        assert allocated.wait(10)
        return y + 1

    torch.cuda.empty_cache()  # so the other thread's block is a fresh device allocation
    thread = threading.Thread(target=other_thread)
    thread.start()
    graph, out = capture(forward, device)
    thread.join()
    assert not errors, errors
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full((8,), 3.0, device=device))


def test_a_failed_capture_is_undone():
    device = torch.device("cuda")
    x = torch.ones(4, device=device)
    with pytest.raises(RuntimeError):
        capture(lambda: float(x.sum()), device)  # a device-to-host read cannot be captured
    torch.cuda.empty_cache()  # the allocator is not left believing a capture is underway
    assert torch.equal(x * 2, torch.full((4,), 2.0, device=device))
