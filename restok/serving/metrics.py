"""Prometheus metrics of one server, in its own registry (no process-wide state)."""

from __future__ import annotations

import hashlib

from restok.manifest import Manifest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, manifest: Manifest, backend: str, batch_limit: int):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                                       ProcessCollector)

        self.registry = r = CollectorRegistry()
        self.artifacts_sha256 = hashlib.sha256(
            "".join(f"{k}:{v['sha256']}" for k, v in sorted(manifest.files.items())).encode()).hexdigest()
        self.requests_total = Counter("restok_requests", "API requests by status (health probes and scrapes not "
                                      "counted)", ["status"], registry=r)
        self.images_total = Counter("restok_images", "images generated", registry=r)
        self.request_seconds = Histogram("restok_request_seconds", "API request latency by status", ["status"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds (Linux)
        PlatformCollector(registry=r)
        self.queue_seconds = Histogram("restok_queue_seconds", "time an image waited for its run",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_run_seconds = Histogram("restok_batch_run_seconds", "time of one run (all passes and decoding)",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("restok_batch_size", "images per run",
                                    buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, batch_limit} & set(range(1, batch_limit + 1)))),
                                    registry=r)
        self.pass_seconds = Histogram("restok_pass_seconds", "time of one HAR pass", ["pass_index"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queued = Gauge("restok_queued_images", "images waiting for a run", registry=r)
        self.running = Gauge("restok_running_images", "images in the current run", registry=r)
        Info("restok_model", "the served artifacts", registry=r).info({
            "artifacts_sha256": self.artifacts_sha256, "precision": manifest.precision, "backend": backend,
            "max_batch": str(manifest.max_batch), "batch_limit": str(batch_limit), "kv_cache": manifest.kv_cache})

    def request(self, status: str, seconds: float) -> None:
        self.requests_total.labels(status=status).inc()
        self.request_seconds.labels(status=status).observe(seconds)

    def images(self, n: int) -> None:
        self.images_total.inc(n)

    def observe(self, event: str, **v) -> None:
        """The scheduler's measurements."""
        if event == "queued":
            self.queued.set(v["value"])
        elif event == "running":
            self.running.set(v["value"])
        elif event == "queue_wait":
            self.queue_seconds.observe(v["seconds"])
        elif event == "batch":
            self.batch_size.observe(v["size"])
            self.batch_run_seconds.observe(v["seconds"])
            for i, s in enumerate(v.get("passes") or []):
                self.pass_seconds.labels(pass_index=str(i)).observe(s)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
