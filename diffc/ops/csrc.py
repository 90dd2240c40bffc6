"""The CUDA C++ kernels of ``csrc/``: found or compiled, loaded, and launched on torch's stream.

The kernels are plain ``extern "C"`` CUDA (no torch C++ extension, so no ABI to match). A fused op's
launcher asks :func:`kernel` for one by file and name and runs its Triton kernel where it gets None;
the op file keeps the reference, the Triton kernel and both launchers (``diffc/ops/quantize_rows.py``).
A binary comes from, in order:

1. a cubin ``setup.py`` built with nvcc at install time (``diffc/_csrc/``), used only where the
   manifest says it was built from the very source installed beside it, for this GPU's arch;
2. NVRTC through cuda-python (``cuda.core.Program``) at first use, cached under
   ``$DIFFC_CACHE/kernels/csrc`` by cuda.core's ``FileStreamProgramCache`` (keyed by source, options
   and compiler version), so the next process loads it in milliseconds.

The Triton kernels run instead without cuda-python (``pip install diffc[cuda]``), on tensors not on a
CUDA GPU, on GPUs older than sm_89 (the float8 conversion is an sm_89 instruction), with
``DIFFC_CSRC=0`` or inside :func:`disabled` (the benchmarks time both), and, with one warning, where
a source fails to compile or load.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..fileio import cache_dir
from . import csrc_sources
from .registry import COUNTERS, cdiv

MIN_CAPABILITY = (8, 9)
_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}  # (stem, device index) -> ObjectCode, or None once it failed
ORIGINS: dict[tuple[str, int], str] = {}  # (stem, device index) -> where its binary came from, or why it failed
_kernels: dict[tuple[str, int, str], object] = {}  # (stem, device index, kernel name) -> cuda.core Kernel
_streams: dict[int, object] = {}  # torch stream handle -> cuda.core Stream (a wrapper; torch owns the stream)
_MAX_STREAMS = 64
_enabled = True


@functools.lru_cache(maxsize=None)
def _cuda_core():
    """cuda-python's ``cuda.core``, imported at the first GPU launch (not at ``import diffc``), or None."""
    try:
        import cuda.core
    except ImportError:  # cuda-python is optional: the Triton kernels serve
        return None
    return cuda.core


def _switched_off() -> bool:
    return not _enabled or os.environ.get("DIFFC_CSRC", "1") == "0"


def unavailable(device: torch.device) -> str | None:
    """Why the csrc kernels cannot run on ``device`` (then the Triton kernels do), or None."""
    device = torch.device(device)
    if _switched_off():
        return "switched off (DIFFC_CSRC=0 or csrc.disabled())"
    if device.type != "cuda":
        return f"tensors on {device.type}, not a CUDA GPU"
    if _cuda_core() is None:
        return "cuda-python is not installed (pip install diffc[cuda])"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"sm_{capability[0]}{capability[1]} is older than sm_89"
    return None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the Triton kernels inside this block (the benchmarks time both)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _compile(stem: str, text: str, target: str):
    cc = _cuda_core()
    options = cc.ProgramOptions(arch=target, std="c++17", name=stem)
    program = cc.Program(text, "c++", options)
    try:
        from cuda.core.utils import FileStreamProgramCache
    except ImportError:  # cuda-core before 1.2: compile in every process
        return program.compile("cubin")
    with FileStreamProgramCache(cache_dir() / "kernels" / "csrc") as cache:
        return program.compile("cubin", cache=cache)


def _load(stem: str, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (stem, index)
    with _lock:
        if key in _modules:
            return _modules[key]
        module, cc = None, _cuda_core()
        try:
            with torch.cuda.device(index):  # torch restores its current device (and context) afterwards
                module, ORIGINS[key] = _build(stem, cc, index, arch(device))
        except Exception as exc:  # NVRTC's log, a driver error: the Triton kernels serve, said once
            ORIGINS[key] = f"failed: {exc}"
            warnings.warn(f"diffc: csrc/{stem}.cu could not be built or loaded for {device} ({exc}); "
                          f"its ops run their Triton kernels", RuntimeWarning, stacklevel=3)
        _modules[key] = module
        return module


def _build(stem: str, cc, index: int, target: str):
    """(the loaded module of ``csrc/<stem>.cu`` for GPU ``index``, where its binary came from)."""
    cc.Device(index).set_current()  # torch's primary context, made current for cuda.core
    directory = csrc_sources.source_dir()
    text = csrc_sources.source(stem, directory)
    built = csrc_sources.ahead_of_time(stem, target, directory, text)
    if built is not None:
        return cc.ObjectCode.from_cubin(built.read_bytes(), name=stem), f"ahead-of-time cubin {built}"
    return _compile(stem, text, target), f"NVRTC ({target})"


def kernel(stem: str, name: str, device: torch.device):
    """The ``extern "C"`` kernel ``name`` of ``csrc/<stem>.cu`` for ``device``, or None (see module doc)."""
    if unavailable(device) is not None:
        return None
    device = torch.device(device)
    key = (stem, device.index if device.index is not None else torch.cuda.current_device(), name)
    found = _kernels.get(key)
    if found is None:
        module = _load(stem, device)
        if module is None:
            return None
        found = _kernels[key] = module.get_kernel(name)
    return found


def _stream(device: torch.device):
    handle = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        if len(_streams) >= _MAX_STREAMS:  # handles of streams torch has since destroyed
            _streams.clear()
        stream = _streams[handle] = _cuda_core().Stream.from_handle(handle)
    return stream


def launch(kern, device: torch.device, grid: int, block: int, *args) -> None:
    """Launch on torch's current stream of ``device`` (so CUDA graph capture records it).

    ``args``: tensors (passed as their data pointer), None (a null pointer), or numpy scalars, each
    the C type of its parameter."""
    packed = [np.uintp(a.data_ptr()) if isinstance(a, torch.Tensor) else np.uintp(0) if a is None else a
              for a in args]
    cc = _cuda_core()
    cc.launch(_stream(device), cc.LaunchConfig(grid=grid, block=block), kern, *packed)
    COUNTERS.csrc_launches += 1


# ---------------------------------------------------------------------------------------------
# Rowwise kernels: one block per row, each thread holding NV 16-byte vectors of it
# ---------------------------------------------------------------------------------------------

# the instances csrc/quantize_rows.cu and gelu_tanh_fp8.cu define: vectors per thread -> their
# __launch_bounds__ (fewer threads leave more registers for the row: no spills)
MAX_THREADS = {1: 1024, 2: 1024, 4: 1024, 8: 512, 16: 256}
# A row's block stays at most this wide where a larger NV allows (on an H200: 256 lost 30-75% on the
# feed-forward rows, 1024 up to 40% on 5120-wide ones; bench/results/ops/h200-2026-12-04-csrc-rows.txt).
TARGET_THREADS = 512
# Shorter rows stay with Triton, which measured faster there on an H200 (1536 and 3072 wide: 43 vs 50 us,
# 17 vs 20 us), with a block per row and with a warp per row alike.
MIN_VECTORS = 512
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def row_launch(width: int, dtype: torch.dtype, min_vectors: int | None = None,
               vectors_per_thread: int | None = None) -> tuple[int, int] | None:
    """``(vectors per thread, threads)`` of the block that quantizes a row of ``width`` elements, or None
    where the rowwise kernels are not used: a dtype they lack, a width not a whole number of 16-byte
    vectors, a row shorter than ``min_vectors`` vectors (:data:`MIN_VECTORS` unless an op measured its
    own) or longer than the largest instance holds (32,768 bfloat16 values). ``vectors_per_thread``
    (one of :data:`MAX_THREADS`): the block an op measured fastest, where its instance holds the row;
    otherwise the narrowest block up to :data:`TARGET_THREADS` wide."""
    if dtype not in DTYPE_NAMES or width < 1:
        return None
    per_vector = 16 // dtype.itemsize
    if width % per_vector or width // per_vector < (MIN_VECTORS if min_vectors is None else min_vectors):
        return None
    vectors = width // per_vector
    if vectors_per_thread is not None:
        threads = cdiv(cdiv(vectors, vectors_per_thread), 32) * 32
        if threads <= MAX_THREADS[vectors_per_thread]:
            return vectors_per_thread, threads
    for nv, most in MAX_THREADS.items():
        threads = cdiv(cdiv(vectors, nv), 32) * 32  # whole warps
        if threads <= min(TARGET_THREADS, most) or (nv == max(MAX_THREADS) and threads <= most):
            return nv, threads
    return None


def aligned(*tensors: torch.Tensor | None) -> bool:
    """16-byte aligned data pointers (the kernels load and store whole vectors)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
