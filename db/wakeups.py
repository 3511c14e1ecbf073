"""Wake-ups for idle workers: LISTEN on the jobs channel, with the caller's poll as the fallback."""

import logging
import time

import psycopg

from db.exceptions import DatabaseUnavailable
from db.store import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class JobWakeups:
    """A dedicated connection that LISTENs for new jobs. `wait` returns early when one arrives.

    A lost connection is reopened on the next wait; until then `wait` just sleeps out its timeout,
    so a worker behind a pooler that drops LISTEN still claims work on its polling interval.
    """

    def __init__(self, conninfo: str):
        self._conninfo = conninfo
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> "JobWakeups":
        try:
            self._connect()
        except DatabaseUnavailable as exc:  # `wait` connects again; until then it only sleeps
            log.warning("%s; polling until the database is back", exc, extra={"action": "listen_lost"})
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> None:
        try:
            self._conn = psycopg.connect(self._conninfo, autocommit=True, application_name="acestep-serverless")
            self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.OperationalError as exc:
            self._conn = None
            raise DatabaseUnavailable(f"cannot listen for new jobs: {exc}".splitlines()[0]) from exc

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds; True if jobs were announced (all pending notices are consumed)."""
        if self._conn is None:
            try:
                self._connect()
            except DatabaseUnavailable:
                time.sleep(timeout)
                return False
        try:
            woke = False
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                woke = True
            if woke:
                for _ in self._conn.notifies(timeout=0):
                    pass
            return woke
        except psycopg.OperationalError as exc:
            log.warning("job wake-ups lost; polling", extra={"action": "listen_lost", "error": str(exc)})
            self.close()
            return False
