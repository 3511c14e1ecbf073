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
from db.store import ClaimedJob, JobStore, NewJob
from db.wakeups import JobWakeups

__all__ = [
    "ClaimedJob",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "JobLost",
    "JobNotFound",
    "JobStore",
    "JobWakeups",
    "NewJob",
    "QuotaExceeded",
    "StoreError",
    "make_engine",
]
