"""Cancel requests for running jobs as they happen: `cancel_job` (queries.sql) NOTIFYs the job's id on
CANCEL_CHANNEL and a worker LISTENs there, so it stops that job within a moment instead of at its
next progress write (which stays the fallback, e.g. behind a pooler that drops LISTEN)."""

import logging
import time
from uuid import UUID

import psycopg

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "acestep_cancel"  # db/queries.sql cancel_job: pg_notify('acestep_cancel', <job id>)


class CancelNotices:
    """A dedicated connection that LISTENs for cancel requests. It connects on the first `wait` and
    again after losing the connection; until then `wait` sleeps out its timeout."""

    def __init__(self, conninfo: str):
        self._conninfo = conninfo
        self._conn: psycopg.Connection | None = None
        self._failing = False  # warned once until a connection works again

    def __enter__(self) -> "CancelNotices":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> bool:
        try:
            self._conn = psycopg.connect(self._conninfo, autocommit=True, application_name="acestep-serverless")
            self._conn.execute(f"LISTEN {CANCEL_CHANNEL}")
        except psycopg.Error as exc:
            if not self._failing:
                log.warning("cannot listen for cancels; progress writes still see them",
                            extra={"action": "cancel_listen_failed", "error": str(exc).splitlines()[0]})
            self._failing = True
            self.close()
            return False
        self._failing = False
        return True

    def wait(self, timeout: float) -> list[UUID]:
        """Block up to `timeout` seconds for cancel requests; the ids of the jobs (all pending ones)."""
        if self._conn is None and not self._connect():
            time.sleep(timeout)
            return []
        try:
            ids = [notice.payload for notice in self._conn.notifies(timeout=timeout, stop_after=1)]
            if ids:
                ids += [notice.payload for notice in self._conn.notifies(timeout=0)]
        except psycopg.Error as exc:
            log.warning("cancel notices lost; progress writes still see cancels",
                        extra={"action": "cancel_listen_lost", "error": str(exc)})
            self.close()
            return []
        jobs = []
        for payload in ids:
            try:
                jobs.append(UUID(payload))
            except ValueError:
                log.warning("ignoring a cancel notice that names no job: %r", payload[:80])
        return jobs
