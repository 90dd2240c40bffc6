"""Timing (CUDA events on a GPU, ``perf_counter`` on a CPU), peak memory, the matmul ceiling, PSNR."""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .flops import matmul_flops, tflops_per_s

GB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose ``peak_gb`` holds the peak GPU memory allocated inside the block (None on CPU)."""
    box: dict[str, float | None] = {"peak_gb": None}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        sync(device)
        box["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB


class Interval:
    """One timed interval: CUDA events on a GPU (no sync until read), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start: Any = None
        self._end: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._end = time.perf_counter()

    def ms(self) -> float:
        """Elapsed milliseconds (synchronises on the end event on a GPU)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._end - self._start) * 1e3


@dataclasses.dataclass
class Timed:
    times_ms: list[float]  # the timed repeats, after warm-up
    first_call_s: float  # wall time of the very first call (includes compilation, autotuning)
    output: Any

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> Timed:
    """Call ``fn`` ``warmup`` times (at least once), then time ``repeats`` calls one by one."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        interval = Interval(device)
        interval.start()
        out = fn()
        interval.stop()
        times.append(interval.ms())
    return Timed(times, first, out)


def back_to_back_ms(fn: Callable[[], Any], calls: int) -> float:
    """Mean ms of ``fn()`` over ``calls`` calls launched back to back (CUDA events around them all, after a sync)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def stats(times_ms: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times_ms), "min": min(times_ms), "max": max(times_ms),
            "mean": statistics.fmean(times_ms), "n": len(times_ms), "all": [round(t, 4) for t in times_ms]}


class StepTimer:
    """Times denoising steps of a pipeline that exposes no timer: a step begins at the first DiT call
    after the previous step ended, and ends at the pipeline's step-end callback."""

    def __init__(self, device: torch.device):
        self.device = device
        self.intervals: list[Interval] = []
        self._open = False

    def begin(self, *_args) -> None:
        if not self._open:
            self.intervals.append(Interval(self.device))
            self.intervals[-1].start()
            self._open = True

    def end(self) -> None:
        if self._open:
            self.intervals[-1].stop()
            self._open = False

    def step_ms(self) -> list[float]:
        return [i.ms() for i in self.intervals if i._end is not None]


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, warmup: int = 3,
                   repeats: int = 10) -> dict[str, Any]:
    """Achieved TFLOP/s of a ``size``-cubed matmul: the ceiling the DiT's TFLOP/s is compared with."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in range(2))
    ms = time_calls(lambda: torch.mm(a, b), warmup, repeats, device).median_ms
    a = b = None
    free_memory(device)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "median_ms": ms,
            "tflops": tflops_per_s(matmul_flops(size, size, size), ms)}


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images or videos of one shape (inf when identical)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of different shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN when either has non-finite values)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"outputs of different shapes {tuple(out.shape)} and {tuple(ref.shape)}")
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.nan
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
