"""Prometheus metrics (text exposition format) of the HTTP function and the worker.

The HTTP function's `GET /metrics` (handler/http/app.py) reads the queue and the fleet from the
tables at scrape time (`ApiCollector`: two small queries, so every API replica answers the same and
nothing is kept in step), and adds what only this process saw: webhook deliveries (its dispatcher)
and the ETA error of the jobs that succeeded lately (their finish against the one the submit
answer's ETA promised, `jobs.eta_predicted_at`). The worker's metrics port
(ACESTEP_WORKER_METRICS_PORT, `WorkerMetrics.serve`) shows what its runs did: claims, attempts,
failures, job and stage durations.

Every app and every worker has a CollectorRegistry of its own (none uses the global one), so any
number of them can live in one process (tests) without duplicate registrations. Nothing exported
names a job, a caller or an API key: labels are models, statuses, stages, reasons and outcomes.
"""

import logging
import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from db import JobStatus, StoreError
from db.states import SERVING_STATES, WorkerState

__all__ = ["ApiCollector", "WorkerMetrics", "api_registry", "exposition", "model_label"]

log = logging.getLogger(__name__)

INF = math.inf
# Claim latency: from a near-instant claim by an idle worker to an hour in a queue that waits for
# a scale-from-zero fleet.
CLAIM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, INF)
# A job: seconds on a GPU (a turbo song) to the 30-minute job timeout.
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, INF)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, INF)
# The ETA error is over the jobs that succeeded within this window before the scrape.
ETA_WINDOW_SECONDS = 3600.0

WEBHOOK_OUTCOMES = ("delivered", "failed", "gave_up", "unrecorded")
QUEUE_STATUSES = ("queued", "running")  # the statuses `acestep_queue_depth` counts


def model_label(model: str | None) -> str:
    """A job's `model` as a label: "" (any DiT, rows from before routing) reads "any"."""
    return model or "any"


def exposition(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of a scrape of `registry`: the Prometheus text format, or OpenMetrics
    when the scraper's Accept header asks for it (as the client library's own server answers)."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def _process_collectors(registry: CollectorRegistry) -> None:
    """The client library's standard process_*, python_* and python_gc_* metrics, on `registry`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


# --- the worker ------------------------------------------------------------------------------


class WorkerMetrics:
    """What one worker's runs did, observed as they happen (handler/worker/worker.py, job_run.py)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        _process_collectors(self.registry)
        self.claim_latency = Histogram(
            "acestep_claim_latency_seconds",
            "Time from a job's submit to its first claim by a worker (database clock), per model",
            ["model"], buckets=CLAIM_BUCKETS, registry=self.registry,
        )
        self.attempts = Counter(
            "acestep_job_attempts",
            "Attempts this worker started (claims), per model; kind=first for a job's first attempt, retry after",
            ["model", "kind"], registry=self.registry,
        )
        self.failures = Counter(
            "acestep_job_failures",
            "Failed attempts, per model and reason; final=true when the job failed for good, false when it was "
            "queued again for another attempt",
            ["model", "reason", "final"], registry=self.registry,
        )
        self.job_duration = Histogram(
            "acestep_job_duration_seconds",
            "Time from claim to outcome of each job this worker ran, per model and outcome (succeeded, failed, "
            "queued: back for a retry, canceled, lost: taken over)",
            ["model", "outcome"], buckets=JOB_BUCKETS, registry=self.registry,
        )
        self.stage_duration = Histogram(
            "acestep_stage_duration_seconds",
            "Seconds each stage of a succeeded job took (its share of a batch), as stored in the job's timings",
            ["model", "stage"], buckets=STAGE_BUCKETS, registry=self.registry,
        )

    def claimed(self, job: Any, *, lease_seconds: float) -> float | None:
        """Count an attempt; for a first attempt observe and return the seconds it waited (claimed at =
        the lease's expiry minus its length, both the database's clock, as `created_at`). A retry's wait
        is not observed: the row keeps no time of its return to the queue."""
        model = model_label(job.model)
        first = job.attempt <= 1
        self.attempts.labels(model, "first" if first else "retry").inc()
        if not first:
            return None
        claimed_at: datetime = job.lease_expires_at - timedelta(seconds=lease_seconds)
        waited = max(0.0, (claimed_at - job.created_at).total_seconds())
        self.claim_latency.labels(model).observe(waited)
        return waited

    def failed(self, job: Any, reason: str, *, final: bool) -> None:
        self.failures.labels(model_label(job.model), reason, "true" if final else "false").inc()

    def finished(self, job: Any, outcome: str, seconds: float) -> None:
        self.job_duration.labels(model_label(job.model), str(outcome)).observe(max(0.0, seconds))

    def stages(self, job: Any, timings: dict[str, Any] | None) -> None:
        """The stage seconds a succeeded job stores in its `timings` (handler/worker/job_run.py)."""
        for stage, seconds in ((timings or {}).get("stages") or {}).items():
            self.stage_duration.labels(model_label(job.model), str(stage)).observe(max(0.0, float(seconds)))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Answer scrapes on host:port from a daemon thread; returns (server, thread) (`server.shutdown()` stops it)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("worker metrics on http://%s:%d/metrics", host, port,
                 extra={"action": "metrics_listening", "host": host, "port": port})
        return server, thread


# --- the HTTP function -------------------------------------------------------------------------


class ApiCollector:
    """The HTTP function's metrics, computed at scrape time.

    From the tables: the queue depth per status (queued, running) and model; live workers, their job
    slots and the free ones, counted as /health counts them; alive workers per state. When the
    database cannot be read they are left out and `acestep_database_up` is 0; the process's own
    metrics (webhook deliveries, ETA error) are always there."""

    def __init__(self, services: Any, *, stale_seconds: float, eta_window_seconds: float = ETA_WINDOW_SECONDS) -> None:
        self._services = services
        self._stale = stale_seconds
        self._eta_window = eta_window_seconds
        self._database_was_up = True

    def collect(self) -> Iterable[Metric]:
        try:
            depth = self._services.store.queue_depth()
            workers = self._services.store.workers(stale_seconds=self._stale)
            errors = self._services.store.eta_errors(self._eta_window)
        except StoreError as exc:  # unreachable or refusing: the scrape answers with the rest
            self._database_down(exc)
            yield self._gauge("acestep_database_up", "1 when the job database answered this scrape, else 0", 0)
        else:
            self._database_back()
            yield self._gauge("acestep_database_up", "1 when the job database answered this scrape, else 0", 1)
            yield from self._queue(depth)
            yield from self._fleet(workers, depth)
            yield from self._eta_errors(errors)
        yield self._webhooks()

    @staticmethod
    def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, value=value)

    def _queue(self, depth: list[dict[str, Any]]) -> Iterable[Metric]:
        counts: dict[tuple[str, str], int] = {}
        served = self._services.settings.served_dit_models()
        for status in QUEUE_STATUSES:  # the configured models always show, 0 when none wait
            for model in served:
                counts[(status, model)] = 0
        for row in depth:
            key = (str(row["status"]), model_label(row["model"]))
            counts[key] = counts.get(key, 0) + int(row["jobs"])
        family = GaugeMetricFamily(
            "acestep_queue_depth",
            "Jobs queued (waiting for a worker, retries included) or running, per model (\"any\": jobs for any DiT)",
            labels=["status", "model"],
        )
        for (status, model), jobs in sorted(counts.items()):
            family.add_metric([status, model], jobs)
        yield family

    @staticmethod
    def _fleet(workers: list[dict[str, Any]], depth: list[dict[str, Any]]) -> Iterable[Metric]:
        live = [w for w in workers if w["alive"] and w["state"] in SERVING_STATES]
        live_ids = {w["id"] for w in live}
        slots = sum(int(w["capacity"]) for w in live)
        running = sum(int(r["jobs"]) for r in depth if r["status"] == JobStatus.RUNNING and r["worker_id"] in live_ids)
        yield GaugeMetricFamily("acestep_live_workers", "Workers that heartbeated recently and take work (as /health's "
                                "live_workers)", value=len(live))
        yield GaugeMetricFamily("acestep_worker_slots", "Job slots of the live workers (as /health's worker_slots)",
                                value=slots)
        yield GaugeMetricFamily("acestep_free_slots", "Job slots of the live workers not running a job (slots minus "
                                "their running jobs; with ACESTEP_WORKER_BATCH_JOBS > 1 a batch counts once per job)",
                                value=max(0, slots - running))
        states = GaugeMetricFamily("acestep_workers", "Workers that heartbeated recently, per state", labels=["state"])
        for state in WorkerState:
            states.add_metric([state.value], sum(1 for w in workers if w["alive"] and w["state"] == state))
        yield states

    def _eta_errors(self, rows: list[dict[str, Any]]) -> Iterable[Metric]:
        window = f"{self._eta_window:.0f} s"
        jobs = GaugeMetricFamily("acestep_eta_scored_jobs", f"Jobs that succeeded in the last {window} with a first "
                                 "ETA (the submit answer's), per model", labels=["model"])
        seconds = GaugeMetricFamily("acestep_eta_error_seconds", f"|finish - the finish the first ETA promised| of the "
                                    f"jobs that succeeded in the last {window}: median and p90, per model",
                                    labels=["model", "quantile"])
        ratio = GaugeMetricFamily("acestep_eta_error_ratio", "The same error relative to each job's wait (submit to "
                                  "finish), as benchmarks/eta_accuracy.py scores it: median and p90, per model",
                                  labels=["model", "quantile"])
        for row in sorted(rows, key=lambda r: model_label(r["model"])):
            model = model_label(row["model"])
            jobs.add_metric([model], int(row["jobs"]))
            for quantile in ("0.5", "0.9"):
                key = "p50" if quantile == "0.5" else "p90"
                seconds.add_metric([model, quantile], float(row[f"{key}_seconds"]))
                ratio.add_metric([model, quantile], float(row[f"{key}_ratio"]))
        yield from (jobs, seconds, ratio)

    def _webhooks(self) -> Metric:
        family = CounterMetricFamily(
            "acestep_webhook_deliveries",
            "Webhook POSTs this process made, per outcome: delivered (2xx), failed (retried later), gave_up (the "
            "last attempt failed), unrecorded (the outcome could not be written; retried after the claim)",
            labels=["outcome"],
        )
        webhooks = getattr(self._services, "webhooks", None)
        counts = webhooks.delivery_counts() if webhooks is not None else {}
        for outcome in dict.fromkeys([*WEBHOOK_OUTCOMES, *sorted(counts)]):
            family.add_metric([outcome], counts.get(outcome, 0))
        return family

    def _database_down(self, exc: Exception) -> None:
        if self._database_was_up:
            log.warning("metrics: job database unavailable; exporting acestep_database_up 0: %s", exc,
                        extra={"action": "metrics_database_unavailable", "error": str(exc)})
        self._database_was_up = False

    def _database_back(self) -> None:
        if not self._database_was_up:
            log.info("metrics: job database reachable again", extra={"action": "metrics_database_back"})
        self._database_was_up = True


def api_registry(services: Any, *, stale_seconds: float) -> CollectorRegistry:
    """A registry of the HTTP function's own: its ApiCollector and the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    _process_collectors(registry)
    registry.register(ApiCollector(services, stale_seconds=stale_seconds))
    return registry
