"""The engine: one worker thread owns the pipeline (and so the GPU); a bounded queue feeds it batches.

With replicas (``diffc serve --data-parallel D``) D worker threads each own a copy of the pipeline on
their own device and take batches from the one queue; the HTTP front, the job store and the metrics
are shared. LoRA operations run on the first replica, whose adapter cache the others share; each batch
brings its replica's weights to the batch's LoRA state as it already does for a single pipeline.

Jobs waiting with the same shape and settings (size, steps, guidance, frames, negative prompt, step cache) run as
one batch of up to ``max_batch`` samples, one seed per sample, so each sample is what it would have
been alone. A request for ``n`` images may be split over several batches. Running a batch and settling
its jobs (progress, retries, errors) is :mod:`.batches`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import random
import threading
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

from ..errors import DiffcError, InvalidArgumentError
from ..lora import snapshot_of
from ..pipelines.base import MAX_SEED
from .batches import BatchRunner
from .jobs import OPTION_KEYS, Counters, Job, JobError, Limits, NotReady, QueueFull, WrongOutputKind
from .metrics import ServerMetrics
from .storage import OutputStore, new_id

# request options a server default fills where a request gives none (size, steps and frames have rules of their
# own in Engine.prepare); the HTTP API has no text-length field, so the server's max_sequence_length (a compiled
# artifact's) holds for every request
SERVER_DEFAULTED = ("guidance_scale", "max_sequence_length", "true_cfg_scale")

__all__ = ["Engine", "Job", "JobError", "Limits", "NotReady", "QueueFull", "WrongOutputKind"]

log = logging.getLogger("diffc.serve")

_LOAD_LOCK = threading.Lock()
ABORT_WAIT_S = 30.0  # how long shutdown waits for an aborted batch to reach its next step


class Engine(BatchRunner):
    """Owns the pipeline on a worker thread. ``load()`` runs on that thread and returns the pipeline.

    ``defaults`` overrides the family's defaults for options a request leaves out; ``warmup`` holds the
    options of one generation run before the engine reports ready (``None``: no warm-up).
    """

    def __init__(self, load: Callable[[], Any], *, model_id: str, limits: Limits | None = None,
                 defaults: dict[str, Any] | None = None, warmup: dict[str, Any] | None = None,
                 output_dir: str | Path | None = None, keep_outputs: int = 100, output_ttl_s: float | None = None,
                 metrics: ServerMetrics | None = None, fps: int = 16,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 replicas: Sequence[Callable[[], Any]] = (), parallel: str | None = None):
        self._loads = [load, *replicas]  # one worker thread and one pipeline per loader
        self.parallel = parallel  # the multi-GPU layout every generation runs on (serve --num-gpus), for /health
        self.model_id, self.limits = model_id, limits or Limits()
        self.defaults, self.warmup, self.fps, self.on_fatal = dict(defaults or {}), warmup, fps, on_fatal
        self.metrics = metrics or ServerMetrics()
        self.store = OutputStore(output_dir, keep=keep_outputs, ttl_s=output_ttl_s, on_evict=self._forget)
        self.counters = Counters()
        self.created = int(time.time())
        self.state = "starting"  # starting, loading, warming, ready, failed, stopping, stopped
        self.load_error: BaseException | None = None
        self.fault: BaseException | None = None  # what broke a loaded engine for good (see fail)
        self.pipe = None  # the first replica's pipeline: the spec, validation, LoRA operations
        self._pipes: list[Any] = [None] * len(self._loads)
        self._loaded = 0
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[Job] = collections.deque()
        self._running: dict[int, list[Job]] = {}  # replica -> the jobs of the batch it runs
        self._videos: dict[str, Job] = {}
        self._controls: collections.deque[tuple[Callable[[], Any], Any]] = collections.deque()
        self.lora_default: tuple = ()  # LoRA snapshot of requests that name no adapter (set by /v1/set_lora)
        self._abort = False
        self._restored: list[tuple[str, Path, float]] = []
        self._batch_ema_s = 1.0
        self._ready = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name="diffc-engine" if i == 0 else f"diffc-engine-{i}")
                         for i in range(len(self._loads))]
        self.metrics.bind_queue(lambda: len(self._queue), lambda: sum(len(j) for j in self._running.values()))

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._restored = self.store.start()
        if self._restored:
            log.info("indexed %d outputs left in %s by an earlier server", len(self._restored), self.store.root)
        for thread in self._threads:
            thread.start()

    @property
    def replicas(self) -> int:
        return len(self._loads)

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == "ready"

    @property
    def output(self) -> str | None:
        """"image" or "video" once loaded."""
        return None if self.pipe is None else self.pipe.spec.output

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, fail the queued ones, let the running batch finish (or fail it after ``timeout``)."""
        with self._cond:
            if self.state == "stopped":
                return
            self.state = "stopping"
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self._fail(job, JobError(503, "the server is shutting down", "shutting_down"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._abort = True  # the running batches stop at their next denoising step
            for thread in self._threads:
                thread.join(ABORT_WAIT_S)
        with self._cond:
            for job in [job for jobs in self._running.values() for job in jobs]:
                self._fail(job, JobError(503, "the server shut down before this job finished", "shutting_down"))
            self.state = "stopped"
        self._ready.set()
        self.store.close()

    def fail(self, exc: BaseException) -> None:
        """Stop serving after a fault the engine cannot recover from (a multi-GPU worker died): /health answers
        503 naming ``exc``, queued jobs fail with it, new requests are refused; shutdown stays as it is."""
        with self._cond:
            if self.state != "ready":
                return
            self.fault, self.state = exc, "failed"
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self.metrics.ready.set(0)
        for job in queued:
            self._fail(job, JobError(503, self.not_ready_message(), "engine_failed", "server_error"))

    # ---- requests --------------------------------------------------------------------------------
    def prepare(self, kind: str, prompt: str, *, n: int = 1, seed: int | None = None,
                size: tuple[int, int] | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, negative_prompt: str | None = None,
                num_frames: int | None = None, seconds: float | None = None, fps: int | None = None,
                cache: Any = None, lora: str | list[str] | None = None,
                lora_strength: float | list[float] | None = None, true_cfg_scale: float | None = None,
                image: Any = None) -> Job:
        """Validate a request against the limits and the model; return a job ready to submit.

        ``image``: the input image(s) of an edit (PIL; without ``size`` the model sizes the output from them), or
        the first frame of an image-to-video model, or its first and last frames (resized to the video's size)."""
        if self.state != "ready":
            raise NotReady(self.not_ready_message())
        pipe, lim = self.pipe, self.limits
        if kind != pipe.spec.output:
            route = "POST /v1/videos" if pipe.spec.output == "video" else "POST /v1/images/generations"
            raise WrongOutputKind("model", f"'{self.model_id}' is a{'n' if pipe.spec.output == 'image' else ''} "
                                  f"{pipe.spec.output} model and cannot make {kind}s; use {route}")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and len(text) > lim.max_prompt_chars:
                raise InvalidArgumentError(name, f"is {len(text)} characters long; this server takes at most "
                                                 f"{lim.max_prompt_chars} (--max-prompt-chars)")
        if not 1 <= n <= lim.max_n:
            raise InvalidArgumentError("n", f"must be from 1 to {lim.max_n} on this server, got {n}")
        # an edit without a size: the model sizes the output from its input image; a video: the server's size
        height, width = size or ((None, None) if image is not None and kind == "image"
                                 else (self._default("height"), self._default("width")))
        if height is not None and width is not None and height * width > lim.max_pixels:  # None: the model picks
            raise InvalidArgumentError("size", f"{width}x{height} is {width * height} pixels; this server allows "
                                       f"at most {lim.max_pixels} (--max-pixels)")
        steps = num_inference_steps if num_inference_steps is not None else self._default("num_inference_steps")
        if steps is not None and steps > lim.max_steps:
            raise InvalidArgumentError("num_inference_steps",
                                       f"must be at most {lim.max_steps} on this server, got {steps}")
        fps = fps or self.fps
        if kind == "video":
            if num_frames is None and seconds is not None:  # 4k+1 frames, as the video VAEs need, lasting
                num_frames = 4 * max(1, round(seconds * fps / 4)) + 1  # (frames - 1) / fps: never 0 s for seconds > 0
            num_frames = num_frames if num_frames is not None else self._default("num_frames")
            if num_frames is not None and num_frames > lim.max_frames:
                raise InvalidArgumentError("num_frames" if seconds is None else "seconds", f"{num_frames} frames is "
                                           f"more than this server's {lim.max_frames} (--max-frames)")
        if seed is None:
            seeds = [random.randrange(2**31) for _ in range(n)]
        elif not 0 <= seed <= MAX_SEED - n + 1:
            raise InvalidArgumentError("seed", f"must be an integer from 0 to {MAX_SEED - n + 1}, got {seed}")
        else:
            seeds = [seed + i for i in range(n)]
        given = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                     negative_prompt=negative_prompt, num_frames=num_frames if kind == "video" else None,
                     true_cfg_scale=true_cfg_scale, image=image)
        for key in SERVER_DEFAULTED:  # the server's defaults where the request leaves them out (or has no field)
            if given.get(key) is None:
                given[key] = self._default(key)
        request = pipe.resolve(prompt=[prompt] * n, seed=seeds, **{k: v for k, v in given.items() if v is not None})
        if request.height is not None and request.width is not None and request.height * request.width > lim.max_pixels:
            raise InvalidArgumentError("size", f"the output would be {request.width}x{request.height}; this server "
                                       f"allows at most {lim.max_pixels} pixels (--max-pixels); give a smaller size")
        options = {k: getattr(request, k) for k in OPTION_KEYS}
        options["cache"] = self.request_cache(cache)
        if lora is None and lora_strength is not None:
            raise InvalidArgumentError("lora_strength", "applies to the adapters named in 'lora'; give one")
        adapters = self.lora_default if lora is None else pipe.lora.request_snapshot(lora, lora_strength)
        return Job(new_id("video" if kind == "video" else "img"), kind, prompt, seeds, options, fps=fps,
                   outputs=[None] * n, lora=adapters)

    def request_cache(self, field: Any):
        """A request's ``cache`` field as a checked ``CacheConfig`` (None: no cache). Absent: the server's
        default (``defaults["cache"]``); ``"none"``: no cache; a kind or ``{"kind": ..., options}``."""
        if field is None:
            return self.defaults.get("cache")
        try:
            return self.pipe.check_cache(field)
        except InvalidArgumentError as exc:
            if exc.field.startswith("cache_options."):
                raise InvalidArgumentError("cache." + exc.field.split(".", 1)[1], exc.message) from None
            raise

    def check_room(self) -> None:
        """Raise ``NotReady`` or ``QueueFull`` as ``submit`` would now (a request checks before decoding uploads)."""
        with self._cond:
            if self.state != "ready":
                raise NotReady(self.not_ready_message())
            if len(self._queue) >= self.limits.max_queue:
                self.counters.rejected += 1
                self.metrics.errors.labels("queue_full").inc()
                depth = len(self._queue) / self.limits.max_batch + 1
                raise QueueFull(max(1, min(600, math.ceil(self._batch_ema_s * depth))))

    def submit(self, job: Job) -> Job:
        with self._cond:
            self.check_room()
            self._queue.append(job)
            if job.kind == "video":
                self._videos[job.id] = job
            self._cond.notify()
        return job

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between two batches (LoRA switches); its result comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.state != "ready":
                raise NotReady(self.not_ready_message())
            self._controls.append((fn, future))
            self._cond.notify_all()  # only the first replica's worker runs controls
        return future

    def cancel(self, job: Job) -> None:
        """Cancel a queued or running job; a finished one just loses its file."""
        with self._cond:
            unfinished = not job.cancelled and job.status in ("queued", "in_progress")
            job.cancelled = True
            self._videos.pop(job.id, None)
            if job in self._queue:
                self._queue.remove(job)
            if not job.future.done():
                job.future.set_exception(JobError(499, "the job was cancelled", "cancelled", "invalid_request_error"))
        self.store.remove(job.id)
        if unfinished:
            self.metrics.jobs.labels(job.kind, "cancelled").inc()
            self._log_finished(job, "cancelled")

    def video(self, id_: str) -> Job | None:
        self.store.prune()
        with self._cond:
            return self._videos.get(id_)

    def videos(self) -> list[Job]:
        self.store.prune()
        with self._cond:
            return list(self._videos.values())

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- worker ----------------------------------------------------------------------------------
    def _restore_videos(self) -> None:
        """Videos an earlier server left in the output directory (it was killed) answer ``GET /v1/videos/{id}``
        and their content route again, as completed jobs whose size, frames and fps come from the file."""
        from ..pipelines.video import read_video_info

        for id_, path, written in self._restored:
            if not id_.startswith("video_"):
                continue
            info = read_video_info(path)
            if info is None:  # not a video ffmpeg can read: it was never a finished output
                self.store.remove(id_)
                continue
            width, height, frames, fps = info
            job = Job(id_, "video", None, [None], {"width": width, "height": height, "num_frames": frames,
                                                    "num_inference_steps": None},
                      fps=fps, created_at=written, status="completed", progress=100, path=path, completed_at=written)
            job.future.set_result(job)
            with self._cond:
                self._videos.setdefault(id_, job)
        self._restored = []

    def _worker(self, replica: int) -> None:
        if replica == 0:
            try:
                self._restore_videos()
            except Exception as exc:  # noqa: BLE001 - old files must not keep the server from starting
                log.warning("could not index the videos left in %s: %s", self.store.root, exc)
        try:
            self._start_replica(replica)
        except BaseException as exc:  # noqa: BLE001 - reported through state and on_fatal
            where = f" (replica {replica})" if self.replicas > 1 else ""
            if isinstance(exc, DiffcError):  # a bad checkpoint, artifact or setting: its one line says it all
                log.error("loading the model failed%s: %s", where, exc)
            else:
                log.exception("loading the model failed%s", where)
            with self._cond:
                first = self.state != "failed"
                if first:
                    self.load_error, self.state = exc, "failed"
                self._cond.notify_all()
            self._ready.set()
            if first and self.on_fatal is not None:
                self.on_fatal(exc)
            return
        with self._cond:  # the other replicas may still be loading
            while self.state in ("starting", "loading", "warming"):
                self._cond.wait()
        pipe = self._pipes[replica]
        while True:
            with self._cond:
                while not self._queue and not (replica == 0 and self._controls) and self.state == "ready":
                    self._cond.wait()
                if self.state != "ready":
                    break
                control = self._controls.popleft() if replica == 0 and self._controls else None
                batch = self._take_batch() if control is None else []
                if batch:
                    self._running[replica] = [job for job, _ in batch]
                now = time.time()
                for job in (job for job, _ in batch):
                    if job.status == "queued":
                        job.status, job.started_at = "in_progress", now
                        self.metrics.queue_wait.labels(job.kind).observe(now - job.created_at)
            if control is not None:
                self._run_control(*control)
                continue
            self._execute(batch, pipe)
            with self._cond:
                self._running.pop(replica, None)
        if replica != 0:
            return
        self.metrics.ready.set(0)
        with self._cond:
            controls, self._controls = list(self._controls), collections.deque()
        for _, future in controls:
            future.set_exception(NotReady(self.not_ready_message()))

    def _start_replica(self, replica: int) -> None:
        """Load (and warm up) this replica's pipeline; the last one to finish makes the engine ready."""
        with self._cond:
            if self.state == "starting":
                self.state = "loading"
        with _LOAD_LOCK:  # one load at a time: model construction patches process-wide state (meta-device init)
            pipe = self._loads[replica]()
        self._pipes[replica] = pipe
        if replica == 0:
            self.pipe = pipe
        if self.warmup is not None and self.state in ("loading", "warming"):
            self.state = "warming"
            self._warm_up(pipe)
        with self._cond:
            self._loaded += 1
            if self._loaded < self.replicas or self.state not in ("loading", "warming"):
                return
            self._share_adapters()
            self.lora_default = snapshot_of(self.pipe)
            self.state = "ready"
            self.metrics.ready.set(1)
            self._cond.notify_all()
        self._ready.set()

    def _share_adapters(self) -> None:
        """Replicas read the first replica's adapter cache (set_lora loads there; each batch merges what its
        LoRA state names on its own replica's weights)."""
        if self.replicas == 1:
            return
        try:
            first = self._pipes[0].lora
            for pipe in self._pipes[1:]:
                pipe.lora.adapters = first.adapters
        except (InvalidArgumentError, AttributeError):  # a pipeline without diffc's LoRA (generic, offloaded)
            pass

    @staticmethod
    def _run_control(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            future.set_exception(exc)

    def _warm_up(self, pipe) -> None:
        from ..compile.examples import with_example_images  # editing, image-to-video: grey input images

        options = {"height": self._default("height", pipe), "width": self._default("width", pipe),
                   "num_inference_steps": 1, **{k: self._default(k, pipe) for k in SERVER_DEFAULTED}}
        if pipe.spec.output == "video":
            options["num_frames"] = self._default("num_frames", pipe)
        options.update(self.warmup)
        options = with_example_images(pipe, options)
        start = time.perf_counter()
        pipe.generate("warm-up", seed=0, progress=False, **{k: v for k, v in options.items() if v is not None})
        log.info("warm-up took %.2f s", time.perf_counter() - start)

    def _take_batch(self) -> list[tuple[Job, range]]:
        """The head job's samples plus those of later jobs with the same key, up to ``max_batch``."""
        key, room, batch = self._queue[0].key, self.limits.max_batch, []
        for job in list(self._queue):
            if job.key != key:
                continue
            k = min(room, job.n - job.taken)
            batch.append((job, range(job.taken, job.taken + k)))
            job.taken += k
            room -= k
            if job.taken == job.n:
                self._queue.remove(job)
            if room == 0:
                break
        return batch

    def _forget(self, id_: str) -> None:
        with self._cond:
            self._videos.pop(id_, None)

    def _default(self, key: str, pipe=None):
        return self.defaults.get(key, (pipe or self.pipe).spec.defaults.get(key))

    def not_ready_message(self) -> str:
        if self.fault is not None:
            return f"the engine failed and serves no more requests: {self.fault}"
        if self.state == "failed":
            return f"the model failed to load: {self.load_error}"
        if self.state in ("stopping", "stopped"):
            return "the server is shutting down"
        return "the model is still loading; poll GET /health until it answers 200"
