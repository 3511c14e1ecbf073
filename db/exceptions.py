"""Errors raised by the job store. Driver errors never leave `db/` untranslated."""


class StoreError(Exception):
    """The job store failed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())


class DatabaseUnavailable(StoreError):
    """The database could not be reached; the operation may be retried."""


class JobNotFound(StoreError):
    """No job has this id."""


class JobLost(StoreError):
    """This worker no longer owns the job (its lease expired and another attempt took over, or it was canceled)."""


class IdempotencyConflict(StoreError):
    """The idempotency key was already used for a different request."""


class QuotaExceeded(StoreError):
    """This caller already has the most queued jobs it may have."""
