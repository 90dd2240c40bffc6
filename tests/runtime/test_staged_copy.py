"""The staging ring that copies the fp8 tier's bf16 originals between the GPU and host memory
(``diffc/runtime/staged_copy.py``): every byte arrives, whatever the sizes (empty, under one chunk, across
chunk and ring boundaries); without a GPU, or without page-locked memory, the plain copy serves."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import DiffcError
from diffc.runtime import staged_copy
from diffc.runtime.staged_copy import Ring

SHAPES = [(0,), (1,), (7, 3), (1000, 37), (64, 4097), (3, 5, 7)]


def _tensors(device, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]


def test_on_the_cpu_the_ring_is_a_plain_copy():
    src = _tensors("cpu")
    with Ring() as ring:
        hosted = ring.to_host(src)
        back = ring.to_device(hosted, "cpu")
        assert not ring.buffers  # nothing to stage: no page-locked memory taken
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() or not a.numel() for a, b in zip(src, hosted))
    assert all(torch.equal(a, b) for a, b in zip(src, back))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_every_byte_crosses_both_ways_across_chunk_and_ring_boundaries(monkeypatch, dtype):
    monkeypatch.setattr(staged_copy, "CHUNK_BYTES", 64 << 10)  # many chunks a tensor, the ring reused many times
    src = [(t * 40 if dtype == torch.uint8 else t).to(dtype) for t in _tensors("cuda", torch.float32)]
    with Ring() as ring:
        hosted = ring.to_host(src)
        assert all(h.device.type == "cpu" and not h.is_pinned() for h in hosted)
        back = ring.to_device(hosted, "cuda")
        assert 0 < len(ring.buffers) <= staged_copy.BUFFERS
    assert not ring.buffers and not ring.pinned  # unpinned at the end
    for a, h, b in zip(src, hosted, back):
        assert torch.equal(a.cpu(), h) and torch.equal(a, b) and b.device.type == "cuda"


@gpu
def test_without_page_locked_memory_the_plain_copy_serves(monkeypatch):
    def refuse(*args, **kwargs):
        raise DiffcError("no page-locked memory")

    monkeypatch.setattr(staged_copy, "pin", refuse)
    src = _tensors("cuda")
    with Ring() as ring:
        hosted = ring.to_host(src)
        back = ring.to_device(hosted, "cuda")
        assert not ring.buffers
    assert all(torch.equal(a.cpu(), h) and torch.equal(a, b) for a, h, b in zip(src, hosted, back))
