"""Queue maintenance: the periodic work no single job owns, in one place (after River's maintenance/).

* rescue: jobs whose worker stopped heartbeating go back to the queue, or fail once out of attempts
  (`JobStore.rescue_expired`; one rescuer at a time, so any number of processes may run this);
* prune: finished jobs older than the retention period are deleted, their files with them;
* webhooks: finished jobs' webhooks are delivered from the outbox (`handler/webhooks.py`), on a thread
  of their own so that a slow receiver never holds up a rescue;
* sweep (hourly): objects no job row points at are deleted once they are an hour old: a dead attempt's
  outputs, a half-written file, the uploads of a submit whose process died before its row was made.

Workers run it without webhooks; the HTTP function runs all three (`handler/http/app.py`). Every task
works from the tables, so whatever a stopped process leaves undone waits for the next one.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from db import JobStatus, JobStore, StoreError
from handler.storage import ObjectStorage, StorageError
from handler.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

PRUNE_BATCH = 500
SWEEP_GRACE_SECONDS = 3600.0  # an object younger than this may belong to a submit or upload in flight
LONGEST_WAIT_SECONDS = 60.0  # run_until looks at its schedule at least this often


@dataclass
class MaintenanceRound:
    """What one round did. A task that did not run (not due, or no webhooks) leaves its field None."""

    rescued: list[tuple[UUID, JobStatus]] | None = None
    pruned: int | None = None
    swept: int | None = None
    webhooks_sent: int | None = None
    failed: dict[str, Exception] = field(default_factory=dict)  # task name -> what it raised


class Maintenance:
    """Runs the maintenance tasks of one process: `tick` (what is due) or `run_once` (everything),
    `run_until(stop)` as a loop, or `start`/`stop` on background threads.

    Each task's failure is logged and isolated: the others still run, and the failed one runs again
    when it is next due."""

    TASKS = ("rescue", "prune", "sweep")  # the periodic ones; webhook delivery keeps its own loop

    def __init__(
        self,
        store: JobStore,
        storage: ObjectStorage,
        *,
        retention_seconds: float,
        webhooks: WebhookDispatcher | None = None,
        rescue_every: float = 5.0,
        prune_every: float = 60.0,
        sweep_every: float = 3600.0,
    ):
        self._store = store
        self._storage = storage
        self._retention_seconds = retention_seconds
        self._webhooks = webhooks
        self._every = {"rescue": rescue_every, "prune": prune_every, "sweep": sweep_every}
        self._last_run = {task: -float("inf") for task in self.TASKS}  # time.monotonic() of each task's last run
        self._stop: threading.Event | None = None
        self._threads: list[threading.Thread] = []

    # --- the tasks -------------------------------------------------------------------------

    def rescue(self, *, now: datetime | None = None) -> list[tuple[UUID, JobStatus]]:
        """Requeue or fail the jobs whose lease expired; (id, new status) of each (the store logs them)."""
        return self._store.rescue_expired(now=now)

    def prune(self, *, now: datetime | None = None) -> int:
        """Delete finished jobs past the retention period and their files; returns how many jobs went.
        A deleted job's files that cannot be removed are logged (an orphaned file, never a job that
        points at a missing one)."""
        pruned = 0
        for ids in self._store.prune_finished(self._retention_seconds, batch=PRUNE_BATCH, now=now):
            for job_id in ids:
                try:
                    self._storage.delete_prefix(f"jobs/{job_id}/")
                except StorageError as exc:
                    log.warning("could not delete the files of pruned job %s: %s", job_id, exc,
                                extra={"action": "prune_objects_failed", "job_id": str(job_id)})
            pruned += len(ids)
        if pruned:
            log.info("pruned %d finished jobs", pruned, extra={"action": "pruned", "count": pruned})
        return pruned

    def sweep(self, *, older_than: float = SWEEP_GRACE_SECONDS) -> int:
        """Delete the objects under jobs/ that no job row points at and that are older than
        `older_than` seconds (younger ones may belong to a submit or an upload in flight): every object
        of a job that has no row, and of a finished job all but its result's audio and its inputs.
        Returns how many objects went. Lists the whole jobs/ prefix: hourly, not per round."""
        cutoff = time.time() - older_than
        folders: dict[str, list[tuple[str, float]]] = {}
        for key, modified in self._storage.list_keys("jobs"):
            parts = key.split("/")
            if len(parts) >= 3:
                folders.setdefault(parts[1], []).append((key, modified))
        ids = {}
        for name in folders:
            try:
                ids[name] = UUID(name)
            except ValueError:
                continue  # not ours to judge
        rows = self._store.jobs_of_objects(list(ids.values())) if ids else {}
        swept = 0
        for name, objects in folders.items():
            if name not in ids:
                continue
            row = rows.get(ids[name])
            if row is not None and row["status"] not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
                continue  # queued or running: its files are in use
            keep = set()
            if row is not None:
                keep |= set((row["result"] or {}).get("audio_keys", []))
                keep |= {ref["key"] for ref in (row["inputs"] or {}).values() if isinstance(ref, dict) and "key" in ref}
            for key, modified in objects:
                if key not in keep and modified < cutoff:
                    self._storage.delete(key)
                    swept += 1
        if swept:
            log.info("swept %d orphaned objects", swept, extra={"action": "swept", "count": swept})
        return swept

    # --- rounds ----------------------------------------------------------------------------

    def tick(self, *, now: datetime | None = None, only: tuple[str, ...] = TASKS) -> MaintenanceRound:
        """Run the periodic tasks (of `only`) that are due (each at most once per its `*_every` seconds)."""
        due = [task for task in only if time.monotonic() - self._last_run[task] >= self._every[task]]
        return self._run(due, now=now)

    def run_once(self, *, now: datetime | None = None) -> MaintenanceRound:
        """Run rescue and prune now, due or not, and one round of webhook delivery if this instance
        has webhooks (the sweep lists every object: it runs on its hourly schedule, `tick`/`start`,
        or called itself). `now` (the database clock when None) is what the statements take as the time."""
        return self._run([t for t in self.TASKS if t != "sweep"], now=now, webhooks=self._webhooks is not None)

    def _run(self, tasks: list[str], *, now: datetime | None, webhooks: bool = False) -> MaintenanceRound:
        outcome = MaintenanceRound()
        for task in tasks:
            self._last_run[task] = time.monotonic()  # a failed task waits its period too, not a hot loop
            try:
                if task == "rescue":
                    outcome.rescued = self.rescue(now=now)
                elif task == "sweep":
                    outcome.swept = self.sweep()
                else:
                    outcome.pruned = self.prune(now=now)
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others
                self._failed(task, exc, outcome)
        if webhooks:
            try:
                outcome.webhooks_sent = self._webhooks.run_once()
            except Exception as exc:  # noqa: BLE001
                self._failed("webhooks", exc, outcome)
        return outcome

    @staticmethod
    def _failed(task: str, exc: Exception, outcome: MaintenanceRound) -> None:
        outcome.failed[task] = exc
        if isinstance(exc, StoreError | StorageError):  # the database or storage is away: expected, retried
            log.warning("maintenance task %s failed: %s", task, exc, extra={"action": f"{task}_failed"})
        else:
            log.exception("maintenance task %s failed", task, extra={"action": f"{task}_failed"})

    # --- running it ------------------------------------------------------------------------

    def run_until(self, stop: threading.Event, only: tuple[str, ...] = TASKS) -> None:
        """Tick until `stop` is set, sleeping until the next task is due. (Webhooks: see `start`.)"""
        while not stop.is_set():
            self.tick(only=only)
            stop.wait(self._seconds_to_next(only))

    def _seconds_to_next(self, only: tuple[str, ...]) -> float:
        clock = time.monotonic()
        waits = [self._last_run[task] + self._every[task] - clock for task in only]
        return min(max(min(waits), 0.05), LONGEST_WAIT_SECONDS)

    def start(self, only: tuple[str, ...] = TASKS) -> list[threading.Thread]:
        """Run in the background: `run_until` (the tasks of `only`) on one thread and, with webhooks,
        the dispatcher's own loop on another. Returns the threads; `stop` ends them."""
        if self._threads:
            raise RuntimeError("maintenance is already running")
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.run_until, args=(self._stop, only), name="maintenance", daemon=True)]
        if self._webhooks is not None:
            self._threads.append(
                threading.Thread(target=self._webhooks.run_until, args=(self._stop,), name="webhooks", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        return list(self._threads)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the threads of `start` and wait up to `timeout` seconds for them; a task in flight
        finishes first."""
        if self._stop is None:
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop, self._threads = None, []
