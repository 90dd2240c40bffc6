"""Prometheus metrics for one server, in a registry of its own (so tests can run several servers)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    """Queue depth, latency, per-stage time, batch sizes, errors and HTTP traffic."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ready = Gauge("diffc_ready", "1 once the model is loaded and warmed up", registry=r)
        self.queue_depth = Gauge("diffc_queue_depth", "jobs waiting for the worker", registry=r)
        self.running = Gauge("diffc_jobs_running", "jobs in the batch the worker is running", registry=r)
        self.http_requests = Counter("diffc_http_requests", "HTTP requests answered",
                                     ["method", "route", "status"], registry=r)
        self.request_latency = Histogram("diffc_request_latency_seconds", "submission to result, per job",
                                         ["kind"], buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("diffc_queue_wait_seconds", "submission to start of its first batch",
                                    ["kind"], buckets=SECONDS, registry=r)
        self.batch_seconds = Histogram("diffc_batch_seconds", "wall time of one batched generation",
                                       ["kind"], buckets=SECONDS, registry=r)
        self.stage_seconds = Histogram("diffc_stage_seconds", "time per pipeline stage, per batch",
                                       ["stage"], buckets=SECONDS, registry=r)
        self.batch_size = Histogram("diffc_batch_size", "samples per batched generation",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.samples = Counter("diffc_samples_generated", "images or videos generated", ["kind"], registry=r)
        self.jobs = Counter("diffc_jobs_finished", "jobs finished, by outcome", ["kind", "status"], registry=r)
        self.errors = Counter("diffc_errors", "failed generations and refused requests, by reason",
                              ["reason"], registry=r)
        self.peak_memory = Gauge("diffc_peak_memory_mb", "peak memory of the last batch (GPU, or host RSS on CPU)",
                                 registry=r)

    def bind_queue(self, depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)
        self.running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
