"""Queue operations on the jobs table. Each method runs exactly one statement from `queries.sql`."""

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from db.exceptions import (
    DatabaseUnavailable,
    IdempotencyConflict,
    JobLost,
    JobNotFound,
    QuotaExceeded,
    StoreError,
)
from db.ids import new_job_id
from db.sql import statements
from db.states import JobStatus, WorkerState

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "acestep_jobs"
RESCUE_LOCK_KEY = 0x4ACE57E9  # pg advisory lock that serialises rescuers


@dataclass(frozen=True)
class NewJob:
    """What a submitter knows about a job: the request, the models it runs on (`model` the DiT, ""
    = any; `lm_model` the 5 Hz LM, "" = none needed, "*" = any) and its cost-model features (see the
    jobs table: songs, seconds per song or None while the LM is to choose, DiT steps, LM mode)."""

    request: dict[str, Any]
    priority: int = 0
    model: str = ""
    lm_model: str = ""
    task_type: str = "text2music"
    items: int = 1
    audio_seconds: float | None = None
    dit_steps: int = 8
    lm_mode: int = 0

    def as_row(self) -> dict[str, Any]:
        """The fields of a bulk insert; those at their defaults are left out (the SQL fills them)."""
        row: dict[str, Any] = {"request": self.request}
        for name, default in _NEW_JOB_DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                row[name] = value
        return row


_NEW_JOB_DEFAULTS = {"priority": 0, "model": "", "lm_model": "", "task_type": "text2music", "items": 1, "audio_seconds": None,
                     "dit_steps": 8, "lm_mode": 0}


@dataclass(frozen=True)
class Submitted:
    id: UUID
    status: JobStatus
    created: bool


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now runs; `attempt` is the fencing token for every later write."""

    id: UUID
    attempt: int
    max_attempts: int
    priority: int
    owner: str
    model: str
    task_type: str
    request: dict[str, Any]
    created_at: datetime
    lease_expires_at: datetime


@dataclass(frozen=True)
class WebhookDelivery:
    """A claimed outbox row; `attempts` fences its outcome like a job's attempt."""

    id: int
    job_id: UUID
    url: str
    event: str
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before attempt n+1: min(base * 2**(n-1), max) seconds."""

    base_seconds: float = 5.0
    max_seconds: float = 300.0


@dataclass(frozen=True)
class CancelOutcome:
    before: JobStatus
    after: JobStatus | None  # None: the job had already finished, nothing changed


def _names(names: Sequence[str] | None) -> list[str] | None:
    """A text[] parameter: a list (possibly empty), or None (no filter)."""
    return None if names is None else [str(n) for n in names]


def request_hash(request: dict[str, Any]) -> str:
    """A stable digest of a request body, to tell a retried submit from a different one."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn driver errors into the store's own exceptions."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc}".splitlines()[0]) from exc
    except psycopg.Error as exc:
        raise StoreError(f"database error: {exc}".splitlines()[0]) from exc
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig or exc}".splitlines()[0]) from exc
    except sa_exc.DBAPIError as exc:
        raise StoreError(f"database error: {exc.orig or exc}".splitlines()[0]) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(f"database error: {exc}".splitlines()[0]) from exc


class JobStore:
    """The job queue. `clock` (if given) supplies `now` for every statement; else the database's."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        clock: Callable[[], datetime | None] = lambda: None,
    ):
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.retry = retry
        self.clock = clock

    def _run(self, statement: str, now: datetime | None, /, **params: Any) -> list[Any]:
        """Run one named statement on a pooled connection, straight on the driver (the hot path
        spends no time in the SQL layer); returns its rows as named tuples."""
        params["now"] = now if now is not None else self.clock()
        with translated_errors():
            conn = self.engine.raw_connection()
            try:
                with conn.driver_connection.cursor(row_factory=namedtuple_row) as cur:
                    cur.execute(statements()[statement], params)
                    return cur.fetchall() if cur.description else []
            except (psycopg.OperationalError, psycopg.InterfaceError):
                conn.invalidate()  # the pool must not hand this connection out again
                raise
            finally:
                conn.close()

    # --- submitting and reading -------------------------------------------------------------

    def submit(
        self,
        job: NewJob,
        *,
        job_id: UUID | None = None,
        owner: str = "",
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        max_queued: int | None = None,
        now: datetime | None = None,
    ) -> Submitted:
        """Queue a job. With an idempotency key, the same key and body return the same job.
        With `max_queued`, raises QuotaExceeded while the owner has that many jobs queued or running."""
        digest = request_hash(job.request)
        rows = self._run(
            "submit_job",
            now,
            id=job_id or new_job_id(),
            owner=owner,
            idempotency_key=idempotency_key,
            request_hash=digest,
            priority=job.priority,
            request=Jsonb(job.request),
            model=job.model,
            lm_model=job.lm_model,
            task_type=job.task_type,
            items=job.items,
            audio_seconds=job.audio_seconds,
            dit_steps=job.dit_steps,
            lm_mode=job.lm_mode,
            max_attempts=max_attempts,
            max_queued=max_queued,
        )
        if not rows:
            raise QuotaExceeded(f"at most {max_queued} queued or running jobs per caller; wait for some to finish")
        row = rows[0]
        if not row.created and row.request_hash != digest:
            raise IdempotencyConflict()
        return Submitted(id=row.id, status=JobStatus(row.status), created=row.created)

    def submit_many(
        self, jobs: Sequence[NewJob], *, owner: str = "", max_attempts: int = 3, now: datetime | None = None
    ) -> list[UUID]:
        """Queue many jobs in one statement; returns their ids in input order."""
        if not jobs:
            return []
        ids = [new_job_id() for _ in jobs]
        payload = [{"id": str(job_id), **job.as_row()} for job_id, job in zip(ids, jobs, strict=True)]
        self._run("submit_jobs", now, owner=owner, max_attempts=max_attempts, jobs=Jsonb(payload))
        return ids

    def jobs_of_objects(self, ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
        """Status, result and inputs of these jobs, by id (the ones that exist)."""
        return {r.id: r._asdict() for r in self._run("jobs_of_objects", None, ids=[str(i) for i in ids])}

    def find_idempotent(self, owner: str, idempotency_key: str) -> dict[str, Any] | None:
        """The owner's job made with this Idempotency-Key (its id and stored request), if any."""
        rows = self._run("find_idempotent_job", None, owner=owner, key=idempotency_key)
        return rows[0]._asdict() if rows else None

    def get(self, job_id: UUID) -> dict[str, Any]:
        rows = self._run("get_job", None, id=job_id)
        if not rows:
            raise JobNotFound(f"job {job_id} not found")
        return rows[0]._asdict()

    def list_jobs(self, owner: str, *, limit: int = 20, before: tuple[datetime, UUID] | None = None) -> list[dict[str, Any]]:
        """One page of an owner's jobs, newest first; `before` is (created_at, id) of the last row of
        the previous page (jobs created in the same instant page by id)."""
        created_at, job_id = before if before is not None else (None, None)
        rows = self._run("list_jobs", None, owner=owner, limit=limit, before_created_at=created_at, before_id=job_id)
        return [r._asdict() for r in rows]

    def queue_position(self, job_id: UUID, models: Sequence[str] | None = None) -> int:
        """1-based place in claim order while queued; 0 once running or finished. `models`: count
        only the jobs of these DiTs (those competing for the same workers); None: every job."""
        rows = self._run("queue_position", None, id=job_id, models=_names(models))
        if not rows:
            raise JobNotFound(f"job {job_id} not found")
        return int(rows[0].position)

    def queue_front(self, job_id: UUID, limit: int, models: Sequence[str] | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(running, ahead), read at one moment: the running jobs (features, stage, progress) and the
        first `limit` queued jobs in claim order up to the job (itself last if among them); `models`
        as in queue_position (None: every model)."""
        rows = [r._asdict() for r in self._run("queue_front", None, id=job_id, limit=limit, models=_names(models))]
        return [r for r in rows if r["running"]], [r for r in rows if not r["running"]]

    def queue_ahead_total(
        self, job_id: UUID, costs: dict[str, list[float]], default_costs: list[float],
        models: Sequence[str] | None = None,
    ) -> tuple[int, float]:
        """(jobs, priced seconds) of the queued jobs up to and including the job; `costs` maps a model
        to its coefficients (handler/http/cost_model.py), `default_costs` prices the other models;
        `models` as in queue_position."""
        row = self._run("queue_ahead_total", None, id=job_id, costs=Jsonb(costs), default_costs=list(default_costs),
                        models=_names(models))[0]
        return int(row.jobs), float(row.seconds)

    def queue_checkpoints(
        self, costs: dict[str, list[float]], default_costs: list[float], *, step: int = 1000,
        models: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """A rank snapshot: (priority, created_at, id, rank, seconds) of the first job of each priority
        and of every `step`-th job, seconds being the priced work up to it. One pass over the queue
        (over the jobs of `models` only, when given)."""
        rows = self._run("queue_checkpoints", None, costs=Jsonb(costs), default_costs=list(default_costs), step=step,
                         models=_names(models))
        return [r._asdict() for r in rows]

    def queue_gap(
        self, priority: int, after: tuple[datetime, UUID], upto: tuple[datetime, UUID],
        costs: dict[str, list[float]], default_costs: list[float], models: Sequence[str] | None = None,
    ) -> tuple[int, float]:
        """(jobs, priced seconds) of the queued jobs of `priority` after `after` up to `upto` (of
        `models` only, when given)."""
        row = self._run(
            "queue_gap",
            None,
            priority=priority,
            after_created_at=after[0],
            after_id=after[1],
            upto_created_at=upto[0],
            upto_id=upto[1],
            costs=Jsonb(costs),
            default_costs=list(default_costs),
            models=_names(models),
        )[0]
        return int(row.jobs), float(row.seconds)

    def cost_samples(self, limit: int = 500) -> list[dict[str, Any]]:
        """Recent succeeded jobs with their features and stage timings, newest first."""
        return [r._asdict() for r in self._run("cost_samples", None, limit=limit)]

    def stats(self, *, stale_seconds: float = 30.0, now: datetime | None = None, owner: str | None = None) -> dict[str, Any]:
        """Jobs per status (with `owner`, that caller's only), the queue, live workers, the recent mean job time."""
        row = self._run("stats", now, stale_seconds=stale_seconds, owner=owner)[0]
        avg = row.avg_job_seconds
        return {
            "counts": dict(row.counts),
            "queue_depth": row.queue_depth,
            "expired_leases": row.expired_leases,  # running jobs whose worker stopped heartbeating
            "live_workers": row.live_workers,
            "avg_job_seconds": float(avg) if avg is not None else None,
        }

    def record_first_eta(self, job_id: UUID, eta_seconds: float, *, now: datetime | None = None) -> None:
        """Keep the finish the job's first ETA promised (now + eta_seconds); a later call changes nothing."""
        self._run("record_first_eta", now, id=job_id, eta=float(eta_seconds))

    def eta_errors(self, window_seconds: float, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Per model, the jobs that succeeded in the last `window_seconds` with a first ETA, and the
        median and p90 of its error (seconds, and relative to the wait). Read-only; for /metrics."""
        return [r._asdict() for r in self._run("eta_errors", now, window=float(window_seconds))]

    def queue_depth(self) -> list[dict[str, Any]]:
        """Queued jobs per model and running jobs per model and worker: rows of status, model,
        worker_id (None for queued) and jobs. Read-only; for /metrics."""
        return [r._asdict() for r in self._run("queue_depth", None)]

    def cancel(self, job_id: UUID, *, now: datetime | None = None) -> CancelOutcome:
        """Queued -> canceled now; running -> cancel requested (the worker stops between stages)."""
        row = self._run("cancel_job", now, id=job_id)[0]
        if row.status_before is None:
            raise JobNotFound(f"job {job_id} not found")
        after = JobStatus(row.status_after) if row.status_after is not None else None
        return CancelOutcome(before=JobStatus(row.status_before), after=after)

    # --- worker side: every write is fenced -------------------------------------------------

    # Every claim takes `dits` and `lms`, what the caller serves: only jobs whose DiT is one of
    # `dits` (or "", any) and whose LM is "" (none needed), one of `lms`, or "*" with `lms` not
    # empty. None for either: any (a claimer that declares nothing, as tests and benchmarks).

    def claim(
        self, worker_id: str, limit: int, *, dits: Sequence[str] | None = None, lms: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> list[ClaimedJob]:
        """Claim up to `limit` jobs (the caller's free slots) it serves, in priority order."""
        return self._claim(worker_id, limit, batch_key=None, lookahead=None, dits=dits, lms=lms, now=now)

    def claim_job(
        self, worker_id: str, job_id: UUID, *, dits: Sequence[str] | None = None, lms: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> ClaimedJob | None:
        """Claim this one job if it is claimable now (queued, due, served); None otherwise."""
        jobs = self._claim(worker_id, 1, batch_key=None, lookahead=None, job_id=job_id, dits=dits, lms=lms, now=now)
        return jobs[0] if jobs else None

    def claim_batch(
        self, worker_id: str, batch_key: str, limit: int, *, lookahead: int = 200,
        dits: Sequence[str] | None = None, lms: Sequence[str] | None = None, now: datetime | None = None,
    ) -> list[ClaimedJob]:
        """Claim up to `limit` more jobs with `batch_key` from the next `lookahead` it serves in line."""
        return self._claim(worker_id, limit, batch_key=batch_key, lookahead=lookahead, dits=dits, lms=lms, now=now)

    def _claim(
        self, worker_id: str, limit: int, *, batch_key: str | None, lookahead: int | None, now: datetime | None,
        job_id: UUID | None = None, dits: Sequence[str] | None = None, lms: Sequence[str] | None = None,
    ) -> list[ClaimedJob]:
        if limit <= 0:
            return []
        rows = self._run(
            "claim_jobs", now, worker_id=worker_id, limit=limit, batch_key=batch_key, lookahead=lookahead,
            job_id=job_id, lease_seconds=self.lease_seconds, dits=_names(dits), lms=_names(lms),
        )
        return sorted((ClaimedJob(**row._asdict()) for row in rows), key=lambda j: (j.priority, j.created_at, j.id))

    def heartbeat(
        self,
        job: ClaimedJob,
        worker_id: str,
        *,
        stage: str | None = None,
        progress: float | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Extend the lease; returns True when the client asked to cancel. Raises JobLost."""
        row = self._fenced(
            "heartbeat_job", job, worker_id, now, stage=stage, progress=progress, lease_seconds=self.lease_seconds
        )
        return bool(row.cancel_requested)

    def reprice(self, job: ClaimedJob, worker_id: str, audio_seconds: float, *, now: datetime | None = None) -> None:
        """Record the seconds per song once known (the LM chose them). Raises JobLost."""
        self._fenced("reprice_job", job, worker_id, now, audio_seconds=float(audio_seconds))

    def complete_many(
        self,
        results: Sequence[tuple[ClaimedJob, dict[str, Any]] | tuple[ClaimedJob, dict[str, Any], dict[str, Any] | None]],
        worker_id: str,
        *,
        now: datetime | None = None,
    ) -> set[UUID]:
        """Write results, each (job, result) or (job, result, timings); returns the ids written. A
        missing id means that job was lost and its result dropped. `timings`: what its stages cost
        ({"stages": {stage: seconds}, "audio_seconds": seconds per song made, "batch_jobs": n})."""
        if not results:
            return set()
        done = [{"id": str(entry[0].id), "attempt": entry[0].attempt, "result": entry[1],
                 "timings": entry[2] if len(entry) > 2 else None} for entry in results]
        rows = self._run("complete_jobs", now, worker_id=worker_id, done=Jsonb(done))
        return set(rows[0].ids)

    def complete(
        self, job: ClaimedJob, worker_id: str, result: dict[str, Any], *,
        timings: dict[str, Any] | None = None, now: datetime | None = None,
    ) -> None:
        """Mark one job succeeded (with what its stages cost, if known). Raises JobLost if this
        attempt no longer owns it."""
        if job.id not in self.complete_many([(job, result, timings)], worker_id, now=now):
            raise JobLost(f"job {job.id} attempt {job.attempt} is no longer held by {worker_id}; result dropped")

    def fail(
        self,
        job: ClaimedJob,
        worker_id: str,
        error: str,
        *,
        retryable: bool,
        now: datetime | None = None,
    ) -> JobStatus:
        """Record a failed attempt; returns the new status (QUEUED for a retry, else FAILED)."""
        row = self._fenced(
            "fail_job",
            job,
            worker_id,
            now,
            error=error,
            retryable=retryable,
            retry_base_seconds=self.retry.base_seconds,
            retry_max_seconds=self.retry.max_seconds,
        )
        return JobStatus(row.status)

    def release(self, job: ClaimedJob, worker_id: str, *, refund: bool, now: datetime | None = None) -> JobStatus:
        """Put a running job back in the queue (CANCELED instead if a cancel was requested); `refund`
        returns the attempt (soft shutdown)."""
        return JobStatus(self._fenced("release_job", job, worker_id, now, refund=refund).status)

    def finish_canceled(self, job: ClaimedJob, worker_id: str, *, now: datetime | None = None) -> None:
        """The worker stopped a job whose cancel was requested."""
        self._fenced("finish_canceled", job, worker_id, now)

    def _fenced(self, statement: str, job: ClaimedJob, worker_id: str, now: datetime | None, **params: Any) -> Any:
        """Run a write fenced on (id, running, attempt, worker); its one row, or JobLost if the fence held."""
        rows = self._run(statement, now, id=job.id, attempt=job.attempt, worker_id=worker_id, **params)
        if not rows:
            raise JobLost(f"job {job.id} attempt {job.attempt} is no longer held by {worker_id}")
        return rows[0]

    # --- maintenance -----------------------------------------------------------------------

    def rescue_expired(self, *, limit: int = 500, now: datetime | None = None) -> list[tuple[UUID, JobStatus]]:
        """Requeue or fail jobs whose lease expired; returns (id, new status) for each."""
        rows = self._run(
            "rescue_expired",
            now,
            lock_key=RESCUE_LOCK_KEY,
            limit=limit,
            retry_base_seconds=self.retry.base_seconds,
            retry_max_seconds=self.retry.max_seconds,
        )
        for row in rows:
            log.warning(
                "rescued job with expired lease",
                extra={"action": "rescue_expired", "job_id": str(row.id), "status": row.status, "attempt": row.attempt},
            )
        return [(row.id, JobStatus(row.status)) for row in rows]

    def prune_finished(
        self, ttl_seconds: float, *, batch: int = 1000, now: datetime | None = None
    ) -> Iterator[list[UUID]]:
        """Delete finished jobs older than the TTL, one batch per statement; yields each batch's ids."""
        while True:
            ids = [r.id for r in self._run("prune_finished", now, ttl_seconds=ttl_seconds, limit=batch)]
            if ids:
                yield ids
            if len(ids) < batch:
                return

    # --- workers ---------------------------------------------------------------------------

    def register_worker(
        self,
        worker_id: str,
        *,
        host: str,
        capacity: int,
        models: Sequence[str],
        state: WorkerState = WorkerState.STARTING,
        now: datetime | None = None,
    ) -> None:
        self._run(
            "upsert_worker", now, id=worker_id, host=host, capacity=capacity, models=Jsonb(list(models)), state=state
        )

    def touch_worker(self, worker_id: str, *, state: WorkerState | None = None, now: datetime | None = None) -> bool:
        """Heartbeat a worker row; False if it was removed (re-register)."""
        return bool(self._run("touch_worker", now, id=worker_id, state=state))

    def remove_worker(self, worker_id: str) -> None:
        self._run("remove_worker", None, id=worker_id)

    def workers(self, *, stale_seconds: float = 30.0, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every worker row, with `alive` (heartbeat within `stale_seconds`)."""
        return [r._asdict() for r in self._run("list_workers", now, stale_seconds=stale_seconds)]

    def live_capacity(self, *, stale_seconds: float = 30.0, now: datetime | None = None) -> tuple[int, int]:
        """(job slots, workers) of workers that are alive and ready."""
        row = self._run("live_capacity", now, stale_seconds=stale_seconds)[0]
        return int(row.slots), int(row.workers)

    # --- API keys --------------------------------------------------------------------------

    def add_api_key(self, key_id: str, name: str, key_hash: str, *, max_queued: int | None = None) -> None:
        self._run("insert_api_key", None, id=key_id, name=name, key_hash=key_hash, max_queued=max_queued)

    def active_api_keys(self) -> int:
        return int(self._run("count_api_keys", None)[0].active)

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key by its id; False if no key has that id."""
        return bool(self._run("revoke_api_key", None, id=key_id))

    def find_api_key(self, key_hash: str) -> dict[str, Any] | None:
        rows = self._run("find_api_key", None, key_hash=key_hash)
        return rows[0]._asdict() if rows else None

    # --- webhook outbox --------------------------------------------------------------------

    def claim_webhooks(self, *, limit: int = 20, lease_seconds: float = 60.0, now: datetime | None = None) -> list[WebhookDelivery]:
        rows = self._run("claim_webhooks", now, limit=limit, lease_seconds=lease_seconds)
        return [WebhookDelivery(**row._asdict()) for row in rows]

    def webhook_delivered(self, delivery: WebhookDelivery, *, now: datetime | None = None) -> None:
        self._run("webhook_delivered", now, id=delivery.id, attempts=delivery.attempts)

    def webhook_failed(
        self, delivery: WebhookDelivery, error: str, *, max_attempts: int, retry: RetryPolicy, now: datetime | None = None
    ) -> bool:
        """Record a failed POST; True if the delivery was given up."""
        rows = self._run(
            "webhook_failed",
            now,
            id=delivery.id,
            attempts=delivery.attempts,
            error=error[:500],
            max_attempts=max_attempts,
            retry_base_seconds=retry.base_seconds,
            retry_max_seconds=retry.max_seconds,
        )
        return bool(rows and rows[0].gave_up_at is not None)
