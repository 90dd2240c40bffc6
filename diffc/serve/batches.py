"""Running one batch on a replica's pipeline and settling its jobs: the part of the
:class:`~diffc.serve.engine.Engine` its worker threads call (a mixin over the engine's state).

A batch shares one LoRA state and one set of options; its prompts and seeds are the jobs' samples in order.
Progress runs 0-90 % over denoising and 90-99 % over the VAE decode; a shutdown or the cancellation of every
job of the batch stops it at the next step. A failed batch of several jobs is retried job by job, so one bad
request cannot fail its neighbours; errors become the job's HTTP error (400 for a bad field, 500 otherwise,
an out-of-memory named as such).
"""

from __future__ import annotations

import logging
import time

from ..errors import InvalidArgumentError
from ..lora import apply_snapshot
from .jobs import Job, JobError
from .uploads import decoded

log = logging.getLogger("diffc.serve")
# one line per finished request (id, kind, size, status, seconds); `diffc serve` prints it
request_log = logging.getLogger("diffc.serve.requests")

DENOISE_PERCENT = 90  # a job's progress when its denoising is done; its decode takes it to 99


class _Aborted(Exception):
    pass


class BatchRunner:
    """``Engine``'s batch execution; it reads the engine's ``metrics``, ``counters``, ``store``, ``_cond``,
    ``_queue``, ``_abort`` and ``_batch_ema_s``."""

    def _execute(self, batch: list[tuple[Job, range]], pipe) -> None:
        try:
            out = self._generate(batch, pipe)
        except _Aborted:
            for job, _ in batch:
                if not job.cancelled:
                    self._fail(job, JobError(503, "the server shut down before this job finished", "shutting_down"))
            return
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error
            if len(batch) > 1:
                log.warning("a batch of %d jobs failed (%s); retrying each alone", len(batch), exc)
                for item in batch:
                    self._execute([item], pipe)
                return
            self._fail(batch[0][0], self._job_error(exc, batch))
            return
        timings = out.timings
        seconds = timings.total_s
        peak = timings.peak_memory_mb if timings.peak_memory_mb is not None else timings.host_peak_rss_mb
        kind = batch[0][0].kind
        self._batch_ema_s = 0.8 * self._batch_ema_s + 0.2 * seconds
        self.metrics.batch_seconds.labels(kind).observe(seconds)
        for stage, sec in timings.stages.items():
            self.metrics.stage_seconds.labels(stage).observe(sec)
        samples = sum(len(r) for _, r in batch)
        self.metrics.batch_size.observe(samples)
        self.metrics.samples.labels(kind).inc(samples)
        if peak is not None:
            self.metrics.peak_memory.set(peak)
        with self._cond:
            self.counters.batches += 1
            self.counters.samples += samples
            self.counters.max_batch_seen = max(self.counters.max_batch_seen, samples)
        results = out.images if out.images is not None else out.videos
        # a warning about one sample of the batch (its prompt was truncated) goes to that sample's job only
        by_sample = getattr(out, "sample_warnings", None) or {}
        about_one = {f"prompt {k} {w}" for k, ws in by_sample.items() for w in ws}
        shared = [w for w in out.warnings if w not in about_one]
        i = 0
        for job, r in batch:
            job.outputs[r.start:r.stop] = results[i:i + len(r)]
            own = [f"the prompt {w}" for k in range(i, i + len(r)) for w in by_sample.get(k, ())]
            i += len(r)
            job.inference_time_s += seconds
            job.peak_memory_mb = peak if job.peak_memory_mb is None else max(job.peak_memory_mb, peak or 0.0)
            job.warnings += [w for w in shared + own if w not in job.warnings]
            job.finished += len(r)
            if job.finished == job.n and not job.cancelled:
                self._complete(job)

    def _generate(self, batch: list[tuple[Job, range]], pipe):
        prompts, seeds = [], []
        for job, r in batch:
            prompts += [job.prompt] * len(r)
            seeds += job.seeds[r.start:r.stop]
        options = {k: v for k, v in batch[0][0].options.items() if v is not None}
        if "image" in options:  # uploads wait as their files' bytes (see uploads.Upload)
            options["image"] = decoded(options["image"])
        apply_snapshot(pipe, batch[0][0].lora)  # a batch shares one LoRA state (it is in the job key)

        def report(start: int, share: int):
            """Progress from ``start`` to ``start + share`` percent of each job over one phase of the batch."""
            def callback(done: int, total: int) -> None:
                if self._abort or all(job.cancelled for job, _ in batch):
                    raise _Aborted()
                for job, r in batch:
                    job.progress = min(99, int(start + share * (job.finished + len(r) * done / total) / job.n))
            return callback

        # denoising 0-90 %, the VAE decode 90-99 % (a video's decode takes a while), 100 once written
        return pipe.generate(prompts, seed=seeds, progress=False, step_callback=report(0, DENOISE_PERCENT),
                                  decode_callback=report(DENOISE_PERCENT, 99 - DENOISE_PERCENT), **options)

    def _complete(self, job: Job) -> None:
        if job.kind == "video":
            from ..pipelines.video import write_video

            try:
                path = self.store.write(job.id, ".mp4", lambda p: write_video(p, job.outputs[0], fps=job.fps))
            except Exception as exc:  # noqa: BLE001 - a full disk, a failed encoder: the job fails, no file stays
                log.error("writing video %s failed: %s", job.id, exc)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"  # OutputError: no server path
                self._fail(job, JobError(500, f"writing the video failed: {reason}", "output_write_failed"))
                return
            job.outputs = []
        with self._cond:
            if job.cancelled:
                if job.kind == "video":
                    path.unlink(missing_ok=True)
                return
            job.status, job.progress, job.completed_at = "completed", 100, time.time()
            self.counters.completed += 1
            if job.kind == "video":
                job.path = path
                self.store.add(job.id, path)
        self.metrics.jobs.labels(job.kind, "completed").inc()
        self._log_finished(job, "completed")
        self.metrics.request_latency.labels(job.kind).observe(job.completed_at - job.created_at)
        if not job.future.done():
            job.future.set_result(job)

    def _fail(self, job: Job, error: JobError) -> None:
        with self._cond:
            if job.status in ("completed", "failed"):
                return
            job.status, job.error, job.outputs, job.completed_at = "failed", error, [], time.time()
            if job in self._queue:  # the rest of a request split over several batches
                self._queue.remove(job)
            self.counters.failed += 1
            if job.kind == "video" and not job.cancelled:
                self.store.add(job.id, None)  # failed jobs count against retention too
        self.metrics.jobs.labels(job.kind, "failed").inc()
        self.metrics.errors.labels(error.code).inc()
        if not job.cancelled:
            self._log_finished(job, f"failed ({error.code})")
        if not job.future.done():
            job.future.set_exception(error)

    def _job_error(self, exc: Exception, batch) -> JobError:
        job, r = batch[0]
        shape = f"{job.options['width']}x{job.options['height']}, batch of {len(r)}"
        if isinstance(exc, InvalidArgumentError):
            return JobError(400, str(exc), "invalid_value", "invalid_request_error", exc.field)
        if "out of memory" in str(exc).lower():
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
            log.error("out of memory generating %s: %s", shape, exc)
            return JobError(500, f"out of memory while generating ({shape}); try a smaller size, fewer frames "
                            f"or fewer images: {exc}", "out_of_memory")
        log.error("generation failed (%s)", shape, exc_info=exc)
        return JobError(500, f"generation failed: {type(exc).__name__}: {exc}", "generation_failed")

    @staticmethod
    def _log_finished(job: Job, status: str) -> None:
        size = f"{job.options.get('width')}x{job.options.get('height')}"
        if job.kind == "video":
            size += f"x{job.options.get('num_frames')}"
        request_log.info("%s %s %s n=%d %s in %.2f s", job.id, job.kind, size, job.n, status,
                         time.time() - job.created_at)
