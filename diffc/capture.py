"""Capturing work into a CUDA graph, cleanly undone when the capture fails.

Shared by the runtime's CUDA graphs (:mod:`diffc.runtime.cudagraphs`) and the compiler and benchmarks, which time
kernels as the runtime replays them (:mod:`diffc.compile.attention_select`, ``bench.ops``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def abandon_capture(device: torch.device, pool: tuple[int, int]) -> None:
    """Do the allocator's half of ``capture_end`` for a capture that failed: stop routing to ``pool`` and
    release the use ``capture_begin`` took of it. Nothing to do when the capture never began or ended."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
    except RuntimeError:  # "not currently recording to mempool_id"
        return
    torch._C._cuda_releasePool(index, pool)


def capture(fn: Callable[[], Any], device: torch.device, *, pool: tuple[int, int] | None = None,
            stream: torch.cuda.Stream | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` on ``device`` into a new graph (memory from ``pool``, default a new one; on ``stream``,
    default torch's side stream); returns the graph and ``fn``'s output, whose tensors the replays refresh.

    ``pool`` is always an explicit handle so that a failed capture can be undone: torch's ``capture_end``
    raises before it tells the allocator the capture is over, which would leave the allocator believing a
    capture is underway (the next ``empty_cache`` then fails an internal assert) and the pool never released.
    The error propagates; the current stream is restored either way.

    The capture restricts this thread only (``thread_local``): under torch's default ("global") mode another
    thread's allocation or synchronization fails while any thread captures, and ``diffc serve`` runs a
    worker thread per replica, whose first requests capture concurrently, beside its HTTP threads.
    """
    device = torch.device(device)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    previous = torch.cuda.current_stream(device)
    try:
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, stream=stream,
                                                         capture_error_mode="thread_local"):
            out = fn()
    except BaseException:
        abandon_capture(device, pool)
        raise
    finally:
        torch.cuda.set_stream(previous)  # torch.cuda.graph leaves its stream current if capture_end raises
    return graph, out


def replayer(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """``fn`` warmed up once on a side stream (its per-stream workspaces made there), then captured on that
    stream; returns the graph's ``replay`` (the compiler and the benchmarks time kernels this way)."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph, _ = capture(fn, device, stream=stream)
    return graph.replay

