"""Job store: the Postgres schema, its migrations and every SQL statement of the project."""

from db.engine import make_engine
from db.exceptions import DatabaseUnavailable, IdempotencyConflict, JobLost, JobNotFound, StoreError
from db.store import ClaimedJob, JobStore, NewJob

__all__ = [
    "ClaimedJob",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "JobLost",
    "JobNotFound",
    "JobStore",
    "NewJob",
    "StoreError",
    "make_engine",
]
