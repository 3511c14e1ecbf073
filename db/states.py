"""The states of a job and of a worker, spelled as the database stores them.

`queries.sql` and the check constraints (`db/models.py`, `migrations/`) use the same strings; being
`StrEnum`s, the members compare equal to the plain strings a row carries and go to the driver as them.
"""

import enum


class JobStatus(enum.StrEnum):
    """queued -> running -> succeeded | failed | canceled; running -> queued again for a retry."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


# Nothing happens to a job in one of these any more (the webhook trigger fires on entering them).
FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class WorkerState(enum.StrEnum):
    """What a worker row says about its process."""

    STARTING = "STARTING"  # registered, loading its models
    READY = "READY"  # models loaded, a free slot
    BUSY = "BUSY"  # every slot running a job
    SETUP_FAILED = "SETUP_FAILED"  # the models could not be loaded; it takes no work
    STOPPING = "STOPPING"  # allowed by the schema; nothing writes it today


# Workers in these states take work (`live_capacity`, `/health`, `/v1/models`).
SERVING_STATES = frozenset({WorkerState.READY, WorkerState.BUSY})
