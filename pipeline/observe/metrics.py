"""The run's metrics in the Prometheus text format, through prometheus_client: `metrics.prom`
in the run folder, rewritten while the run goes and at its end, and optionally served on
`metrics.port` for scraping during long runs.

Rows by status, images, cost and jobs in flight per key are gauges set from each progress
snapshot; creates, 429s, retries and polls are counters read from the run's own counters when
collected; job latency and notice delay are histograms observed as each job ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import write_to_textfile
from prometheus_client.registry import Collector

from pipeline.core import COUNTERS, RunStats, Status
from pipeline.observe.progress import Snapshot

__all__ = ["RunMetrics"]

_LATENCY_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 45, 60, 120, 300, 900)
_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class _Counters(Collector):
    """The run's counters, as they are when scraped or written."""

    def __init__(self, stats: RunStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self._stats
        for counter in COUNTERS:
            yield CounterMetricFamily(counter.metric, counter.help, value=getattr(s, counter.name))
        if s.downloads is not None:
            d = s.downloads
            yield CounterMetricFamily("wanbatch_images_stored", "Images stored", value=d.stored)
            yield CounterMetricFamily(
                "wanbatch_image_failures", "Images that could not be stored", value=d.failed
            )


class RunMetrics:
    """One run's registry; `update()` from each snapshot, `write()` to the text file."""

    def __init__(self, stats: RunStats) -> None:
        r = self.registry = CollectorRegistry()
        self._rows = Gauge("wanbatch_rows", "Manifest rows by status", ["status"], registry=r)
        self._images = Gauge("wanbatch_images", "Output images of succeeded rows", registry=r)
        self._cost = Gauge("wanbatch_cost_usd", "Cost billed so far (USD)", registry=r)
        self._in_flight = Gauge(
            "wanbatch_in_flight_jobs", "Jobs in flight per API key", ["key"], registry=r
        )
        self._worker_flying = Gauge(
            "wanbatch_worker_in_flight_jobs",
            "Jobs in flight per Ray worker",
            ["worker"],
            registry=r,
        )
        self._worker_finished = Gauge(
            "wanbatch_worker_jobs_finished", "Jobs a Ray worker saw end", ["worker"], registry=r
        )
        self._worker_restarts = Gauge(
            "wanbatch_worker_restarts", "Times a Ray worker was replaced", ["worker"], registry=r
        )
        self._latency = Histogram(
            "wanbatch_job_latency_seconds",
            "Job latency the provider reports (predict_time)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._delay = Histogram(
            "wanbatch_notice_delay_seconds",
            "How long after a job's end the client saw it",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        r.register(_Counters(stats))
        stats.listen(self.observe)

    def observe(self, latency: float, notice_delay: float) -> None:
        self._latency.observe(latency)
        self._delay.observe(notice_delay)

    def update(self, snap: Snapshot) -> None:
        for status in (s.value for s in Status):
            self._rows.labels(status).set(snap.by_status.get(status, 0))
        self._images.set(snap.images)
        self._cost.set(snap.cost_usd)
        for key in snap.keys:
            self._in_flight.labels(key.name).set(key.in_flight)
        for worker in snap.workers:
            self._worker_flying.labels(worker.name).set(worker.in_flight)
            self._worker_finished.labels(worker.name).set(worker.finished)
            self._worker_restarts.labels(worker.name).set(worker.restarts)

    def write(self, path: Path) -> None:
        """The text file, replaced whole (prometheus_client writes a temporary file and
        renames it)."""
        write_to_textfile(str(path), self.registry)

    def serve(self, host: str, port: int) -> Any:
        """Serve the registry on host:port for scraping; the server, to shut down."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
