"""Job store: the Postgres schema, its migrations and every SQL statement of the project."""

from db.engine import make_engine
from db.exceptions import (
    DatabaseUnavailable,
    IdempotencyConflict,
    JobLost,
    JobNotFound,
    QuotaExceeded,
    StoreError,
)
from db.states import JobStatus, WorkerState
from db.store import ClaimedJob, JobStore, NewJob
from db.wakeups import JobWakeups

__all__ = [
    "ClaimedJob",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "JobLost",
    "JobNotFound",
    "JobStatus",
    "JobStore",
    "JobWakeups",
    "NewJob",
    "QuotaExceeded",
    "StoreError",
    "WorkerState",
    "make_engine",
]
