"""Host side of offload: page-locked host buffers, the CUDA operations offload issues, packing a module's
tensors into one byte buffer, and whole components that live in host memory and visit the GPU while
used (model offload, text encoders after use). See ``diffc.runtime.offload`` for the big picture.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import DiffcError
from .offload_plan import COPY, pack_layout

GiB = 1024**3
ALIGN = 512  # the CUDA caching allocator's alignment: packed weights keep it, so cuBLAS picks the same kernels
ENTRY_METHODS = ("encode", "decode")  # besides forward, what starts a component (e.g. vae.decode)

# ---------------------------------------------------------------------------------------------
# Device side: pinned host buffers, device buffers, copy stream, events
# ---------------------------------------------------------------------------------------------


class HostBuffer:
    """``nbytes`` of page-locked host memory as a uint8 tensor (``.tensor``); ``release()`` unpins it."""

    def __init__(self, tensor: torch.Tensor, release: Callable[[], Any] | None = None):
        self.tensor = tensor
        self._release = weakref.finalize(self, release) if release is not None else None

    def release(self) -> None:
        if self._release is not None:
            self._release()


def _unregister(ptr: int, raw: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pin(nbytes: int) -> HostBuffer:
    """Page-locked host memory of exactly ``nbytes`` (page-rounded), registered with CUDA.

    Registering a plain allocation avoids the pinned caching allocator's power-of-two rounding (a 0.7 GB
    block would take 1 GiB), and ``release()`` gives it back to the system (the caching allocator keeps it)."""
    page = mmap.PAGESIZE
    size = max(page, -(-nbytes // page) * page)
    raw = torch.empty(size + page, dtype=torch.uint8)
    start = (-raw.data_ptr()) % page
    region = raw[start : start + size]
    rc = int(torch.cuda.cudart().cudaHostRegister(region.data_ptr(), size, 0))
    if rc != 0:
        raise DiffcError(f"offload: could not page-lock {size / GiB:.2f} GiB of host memory "
                         f"(cudaHostRegister error {rc}); free host memory or use --offload none")
    return HostBuffer(region[:nbytes], functools.partial(_unregister, region.data_ptr(), raw))


class CudaStreams:
    """The CUDA operations offload needs; tests substitute a recording stand-in with the same methods."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def pin(self, nbytes: int) -> HostBuffer:
        """Page-locked host memory of exactly ``nbytes`` (:func:`pin`)."""
        return pin(nbytes)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def event(self, key: tuple) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # create it now, never during a capture
        return event

    def _stream(self, name: str) -> torch.cuda.Stream:
        return self.copy_stream if name == COPY else torch.cuda.current_stream(self.device)

    def record(self, stream: str, event: torch.cuda.Event, op=None) -> None:
        event.record(self._stream(stream))

    def wait(self, stream: str, event: torch.cuda.Event, op=None) -> None:
        self._stream(stream).wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, op=None) -> None:
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)  # on the current stream, before the kernels that read it

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory(self) -> tuple[int, int, int]:
        """(available bytes: free + cached by torch, total bytes, bytes allocated by torch)."""
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        return free + torch.cuda.memory_reserved(self.device) - allocated, total, allocated


# ---------------------------------------------------------------------------------------------
# Packing a module's tensors into one byte buffer
# ---------------------------------------------------------------------------------------------


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module``, each once (tied weights are one object)."""
    seen: set[int] = set()
    out = []
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class _Packing:
    """A module's tensors back to back (``ALIGN``-aligned) in one uint8 buffer; mixed dtypes allowed."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.meta = [(t.dtype, t.shape) for t in tensors]
        self.sizes = [t.numel() * t.element_size() for t in tensors]
        self.offsets, self.nbytes = pack_layout(self.sizes, ALIGN)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[o : o + n].view(dtype).view(shape)
                for (dtype, shape), o, n in zip(self.meta, self.offsets, self.sizes)]

    def fill(self, views: list[torch.Tensor]) -> None:
        for t, v in zip(self.tensors, views):
            v.copy_(t.data)

    def bind(self, views: list[torch.Tensor]) -> None:
        for t, v in zip(self.tensors, views):
            t.data = v

    def restore(self, views: list[torch.Tensor], device: torch.device) -> None:
        """Give every tensor its own fresh copy on ``device`` (what loading would have produced)."""
        for t, v in zip(self.tensors, views):
            t.data = v.to(device, copy=True)

    def bytes_on(self, device: torch.device) -> int:
        """What these tensors take on ``device`` now (allocations round up to ``ALIGN`` bytes)."""
        return sum(-(-n // ALIGN) * ALIGN for t, n in zip(self.tensors, self.sizes) if t.device == device)


def packed_bytes(module: nn.Module) -> int:
    """Bytes ``module``'s parameters and buffers take packed in one offload buffer."""
    return _Packing(_tensors(module)).nbytes


# ---------------------------------------------------------------------------------------------
# Whole components in host memory (model mode, text encoders)
# ---------------------------------------------------------------------------------------------


class HostResident:
    """One component whose weights live in one pinned host buffer and visit the GPU while used.

    Without ``coordinator`` it is uploaded when its forward (or ``encode``/``decode``) starts and
    dropped when the outermost call returns; with one, ``coordinator.activate(self)`` decides.
    """

    def __init__(self, name: str, module: nn.Module, streams, counters: Any, coordinator=None):
        self.name, self.module, self.streams, self.counters = name, module, streams, counters
        self.coordinator = coordinator
        self.packing = _Packing(_tensors(module))
        self.host = streams.pin(self.packing.nbytes)
        self.host_views = self.packing.views(self.host.tensor)
        self.packing.fill(self.host_views)
        self.packing.bind(self.host_views)
        counters.bytes_pinned += self.packing.nbytes
        self.device_buffer: torch.Tensor | None = None
        self._depth = 0
        self._hooks = [module.register_forward_pre_hook(lambda *_: self.enter()),
                       module.register_forward_hook(lambda *_: self.exit(), always_call=True)]
        self._wrapped = []
        for method in ENTRY_METHODS:
            if callable(getattr(type(module), method, None)):
                setattr(module, method, self._wrap(getattr(module, method)))
                self._wrapped.append(method)

    def _wrap(self, fn):
        @functools.wraps(fn)
        def entry(*args, **kwargs):
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return entry

    @property
    def loaded(self) -> bool:
        return self.device_buffer is not None

    def enter(self) -> None:
        self._depth += 1
        if self.coordinator is not None:
            self.coordinator.activate(self)
        else:
            self.load()

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self.coordinator is None:
            self.unload()

    def load(self) -> None:
        if self.device_buffer is None:
            with torch.inference_mode(False):
                self.device_buffer = self.streams.empty(self.packing.nbytes)
                self.streams.upload(self.device_buffer, self.host.tensor)
                self.packing.bind(self.packing.views(self.device_buffer))
            self.counters.component_loads += 1

    def unload(self) -> None:
        if self.device_buffer is not None:
            self.packing.bind(self.host_views)
            self.device_buffer = None  # the caching allocator reuses it in stream order
            self.counters.component_unloads += 1

    def remove(self, device: torch.device) -> None:
        for hook in self._hooks:
            hook.remove()
        for method in self._wrapped:
            del self.module.__dict__[method]
        self._hooks, self._wrapped = [], []
        self.streams.synchronize()
        self.packing.restore(self.host_views, device)
        self.device_buffer, self.host_views = None, []
        self.host.release()


class OneAtATime:
    """Model mode: the component that starts is uploaded, the one on the GPU before it is dropped."""

    def __init__(self):
        self.active: HostResident | None = None

    def activate(self, component: HostResident) -> None:
        if self.active is not component:
            if self.active is not None:
                self.active.unload()
            component.load()
            self.active = component
