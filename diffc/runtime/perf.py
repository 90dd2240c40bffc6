"""Per-stage wall time, per-step time and peak memory, reported with every generation."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclasses.dataclass
class Timings:
    """What one generation cost. ``peak_memory_mb`` is GPU memory on CUDA, else ``None``."""

    device: str
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds
    stage_peak_memory_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    step_ms: list[float] = dataclasses.field(default_factory=list)
    peak_memory_mb: float | None = None
    host_peak_rss_mb: float | None = None
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)  # offload and CUDA-graph state and counters

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    @property
    def mean_step_ms(self) -> float | None:
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_s"] = self.total_s
        out["mean_step_ms"] = self.mean_step_ms
        return out

    def summary(self) -> str:
        parts = [f"total {self.total_s:.2f}s"]
        parts += [f"{name} {sec:.2f}s" for name, sec in self.stages.items()]
        if self.step_ms:
            parts.append(f"{len(self.step_ms)} steps at {self.mean_step_ms:.1f} ms/step")
        if self.peak_memory_mb is not None:
            parts.append(f"peak GPU memory {self.peak_memory_mb:.0f} MB")
        elif self.host_peak_rss_mb is not None:
            parts.append(f"peak host memory {self.host_peak_rss_mb:.0f} MB")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.summary()


class PerfRecorder:
    """Measures stages (synchronising the device at their edges) and denoising steps (with CUDA events)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings = Timings(device=str(device))
        self._step_events: list[tuple[Any, Any]] = []
        self._step_starts: list[float] = []
        self._open: tuple[str, float] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        yield
        self.end()

    def begin(self, name: str) -> None:
        """Start timing stage ``name`` (closing the running one first); time spent in a stage over
        several begin/end spans adds up."""
        if self._open is not None:
            self.end()
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        """Stop the running stage, if any."""
        if self._open is None:
            return
        name, start = self._open
        self._open = None
        _sync(self.device)
        self.timings.stages[name] = self.timings.stages.get(name, 0.0) + time.perf_counter() - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.timings.stage_peak_memory_mb[name] = max(self.timings.stage_peak_memory_mb.get(name, 0.0), peak)
            self.timings.peak_memory_mb = max(self.timings.peak_memory_mb or 0.0, peak)

    def step_begin(self) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._step_events.append((start, None))
        else:
            self._step_starts.append(time.perf_counter())

    def step_end(self) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events[-1] = (self._step_events[-1][0], end)
        else:
            self.timings.step_ms.append((time.perf_counter() - self._step_starts[-1]) * 1e3)

    def finish(self) -> Timings:
        if self._step_events:
            torch.cuda.synchronize(self.device)
            self.timings.step_ms = [s.elapsed_time(e) for s, e in self._step_events]
            self._step_events = []
        self.timings.host_peak_rss_mb = host_peak_rss_mb()
        return self.timings
