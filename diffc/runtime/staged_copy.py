"""Copies of many large tensors between a GPU and pageable host memory, through page-locked staging buffers.

A plain ``tensor.to("cpu")`` into pageable memory ran at 0.98 GB/s on the lent H100 (the driver stages it in
small synchronous pieces); a ring of four 128 MiB page-locked buffers, the copy engine filling one while the
CPU threads drain another, ran the same 8 GB at 8.1 GB/s, and 12.8 GB/s against 5.1 the other way
(``python -m bench.runtime.bench_staged_copy``, ``bench/results/h100-80gb-hbm3-2026-12-06-staged-copy.json``).
The destinations stay ordinary (pageable) memory: only the ring is page-locked, and only while it copies
(registered with CUDA and unregistered after, :func:`diffc.runtime.offload_host.pin`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DiffcError
from .offload_host import HostBuffer, pin

CHUNK_BYTES = 128 << 20
BUFFERS = 4


def host_available_bytes() -> int | None:
    """The host memory the system can give without swapping (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Ring:
    """Page-locked staging buffers, allocated at the first copy that needs them (sized to it, at most
    ``BUFFERS`` x ``CHUNK_BYTES``) and kept for later copies until :meth:`close` (or the ``with`` block's end)."""

    def __init__(self) -> None:
        self.pinned: list[HostBuffer] = []
        self.buffers: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event] = []

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for event in self.events:
            event.synchronize()
        for buffer in self.pinned:
            buffer.release()
        self.pinned, self.buffers, self.events = [], [], []

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of ``tensors`` (CUDA tensors staged through the ring; others copied as they are)."""
        out = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
        pairs = []
        for t, h in zip(tensors, out):
            if t.device.type == "cuda" and t.numel():
                pairs.append((_bytes(t.contiguous()), _bytes(h)))
            else:
                h.copy_(t)
        self._copy(pairs, to_device=False)
        return out

    def to_device(self, tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
        """Copies of host ``tensors`` on ``device`` (a CUDA device: staged through the ring)."""
        device = torch.device(device)
        if device.type != "cuda":
            return [t.to(device) for t in tensors]
        out = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in tensors]
        self._copy([(_bytes(t.contiguous()), _bytes(d)) for t, d in zip(tensors, out) if t.numel()], to_device=True)
        return out

    def _allocate(self, total: int) -> bool:
        size = min(CHUNK_BYTES, -(-total // (2 << 20)) * (2 << 20))
        try:
            for _ in range(min(BUFFERS, -(-total // size))):
                self.pinned.append(pin(size))
        except DiffcError:  # as many buffers as could be had; none: the caller copies plainly
            if not self.pinned:
                return False
        self.buffers = [b.tensor for b in self.pinned]
        self.events = [torch.cuda.Event() for _ in self.buffers]
        return True

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, to_device: bool) -> None:
        """Copy each (source, destination) byte view, one side on a GPU and the other in host memory."""
        if not pairs:
            return
        gpu = (pairs[0][1] if to_device else pairs[0][0]).device
        with torch.cuda.device(gpu):
            if not self.buffers and not self._allocate(sum(src.numel() for src, _ in pairs)):
                for src, dst in pairs:  # no page-locked memory to be had: the plain (slower) copy
                    dst.copy_(src)
                return
            ring, done, size = self.buffers, self.events, self.buffers[0].numel()
            stream = torch.cuda.current_stream()
            pending: list[tuple[torch.Tensor, int] | None] = [None] * len(ring)  # device -> host: still to drain
            k = 0
            for src, dst in pairs:
                for off in range(0, src.numel(), size):
                    n = min(size, src.numel() - off)
                    i = k % len(ring)
                    k += 1
                    done[i].synchronize()  # the copy engine is done with this buffer
                    if to_device:
                        ring[i][:n].copy_(src[off:off + n])
                        dst[off:off + n].copy_(ring[i][:n], non_blocking=True)
                    else:
                        _drain(ring[i], pending[i])
                        ring[i][:n].copy_(src[off:off + n], non_blocking=True)
                        pending[i] = (dst[off:off + n], n)
                    done[i].record(stream)
            for i, event in enumerate(done):
                event.synchronize()
                _drain(ring[i], pending[i])


def _drain(buffer: torch.Tensor, pending: tuple[torch.Tensor, int] | None) -> None:
    if pending is not None:
        dst, n = pending
        dst.copy_(buffer[:n])


__all__ = ["Ring", "host_available_bytes"]
