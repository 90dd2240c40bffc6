"""Jobs and what the engine reports about them: limits, counters, errors."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

# image: the upload(s) of an edit or an image-to-video request (uploads.Upload: the files' bytes)
OPTION_KEYS = ("height", "width", "num_inference_steps", "guidance_scale", "negative_prompt", "num_frames",
               "max_sequence_length", "true_cfg_scale", "image")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the engine holds at once."""

    max_batch: int = 4
    max_queue: int = 64
    max_pixels: int = 2048 * 1024
    max_n: int = 4
    max_steps: int = 100
    max_frames: int = 129
    max_prompt_chars: int = 32000  # prompt and negative prompt, each (OpenAI's gpt-image-1 takes 32000)


@dataclasses.dataclass
class Counters:
    """Totals since start, for tests and logs."""

    batches: int = 0
    samples: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    max_batch_seen: int = 0


class NotReady(Exception):
    """The model is still loading, failed to load, or the server is shutting down."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class WrongOutputKind(InvalidArgumentError):
    """An image request to a video model, or the reverse."""


@dataclasses.dataclass
class JobError(Exception):
    status: int
    message: str
    code: str
    type: str = "server_error"
    param: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(eq=False)
class Job:
    """One request: ``n`` samples of one prompt and one set of options, one seed per sample."""

    id: str
    kind: str  # "image" or "video"
    prompt: str
    seeds: list[int]
    options: dict[str, Any]
    fps: int = 16
    created_at: float = dataclasses.field(default_factory=time.time)
    status: str = "queued"  # queued -> in_progress -> completed | failed
    progress: int = 0
    error: JobError | None = None
    outputs: list[Any] = dataclasses.field(default_factory=list)
    path: Path | None = None
    inference_time_s: float = 0.0
    peak_memory_mb: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    taken: int = 0
    finished: int = 0
    lora: tuple = ()  # the LoRA weights it runs with: a diffc.lora.LoraManager snapshot (() = the base model)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a batch: same shape, settings, step cache and LoRA adapters."""
        return (self.kind,) + tuple(self.options.get(k) for k in OPTION_KEYS) + (self.options.get("cache"), self.lora)
