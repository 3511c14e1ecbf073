"""The GPU worker: loads the models once, claims jobs up to its free slots, runs each on its own
supervised pipeline process, and never loses one (fenced writes, leases, soft shutdown)."""

import logging
import signal
from collections import Counter
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from db import DatabaseUnavailable, JobLost, JobStore, JobWakeups, StoreError, WorkerState
from db.cancel_notices import CancelNotices
from db.store import ClaimedJob
from handler.backends import build_storage, build_store
from handler.maintenance import Maintenance
from handler.settings import Settings
from handler.storage import ObjectStorage
from handler.worker.job_run import JobRun, with_db_retries
from handler.worker.pipeline_process import PipelineError, PipelineProcess
from pipeline.contract import PipelineOptions

log = logging.getLogger(__name__)

RESCUE_EVERY_SECONDS = 5.0
CANCEL_WAIT_SECONDS = 1.0  # how long the cancel listener blocks before it looks at its stop flag


@dataclass
class WorkerOptions:
    pipeline: str
    checkpoint_dir: Path | None = None
    pipeline_options: PipelineOptions = PipelineOptions()  # what the pipeline loads and runs on
    concurrency: int = 1
    batch_jobs: int = 1  # jobs one GPU batch may hold (same model, task, steps, duration bucket)
    once: bool = False
    max_jobs: int | None = None
    exit_when_idle: float | None = None
    heartbeat_seconds: float = 10.0
    job_timeout_seconds: float = 1800.0
    shutdown_grace_seconds: float = 30.0
    retention_seconds: float = 7 * 86400  # the worker prunes finished jobs too (handler.maintenance)
    upload_tries: int = 6  # per attempt, with doubling backoff, before the attempt fails (retryable)
    poll_seconds: float = 5.0
    model_names: tuple[str, ...] = ()
    keep_warm: bool = False  # leave the pipeline processes running after `run` (for the next invocation)


def worker_from_settings(settings: Settings, **options) -> "Worker":
    """A worker on the configured database and storage; `options` override WorkerOptions fields."""
    defaults = {
        "pipeline": settings.pipeline,
        "checkpoint_dir": settings.checkpoint_dir,
        "pipeline_options": settings.pipeline_options(),
        "batch_jobs": settings.worker_batch_jobs,
        "heartbeat_seconds": settings.heartbeat_seconds,
        "job_timeout_seconds": settings.job_timeout_seconds,
        "shutdown_grace_seconds": settings.shutdown_grace_seconds,
        "upload_tries": settings.upload_tries,
        "retention_seconds": settings.retention_seconds,
        "model_names": (settings.dit_model,),
    }
    return Worker(
        build_store(settings, settings.database_url), build_storage(settings), settings.database_url,
        WorkerOptions(**(defaults | options)),
    )


class Slot:
    """A pipeline process and the job it is running, if any."""

    def __init__(self, process: PipelineProcess):
        self.process = process
        self.run: JobRun | None = None


class Worker:
    def __init__(self, store: JobStore, storage: ObjectStorage, wakeups_url: str, options: WorkerOptions,
                 *, make_process: Callable[[], PipelineProcess] | None = None):
        """`make_process` builds each slot's pipeline process (default: a PipelineProcess child as
        `options` say; tests give an in-process stand-in with the same methods)."""
        self._store = store
        self._storage = storage
        self._wakeups_url = wakeups_url
        self._options = options
        self.worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        make_process = make_process or (lambda: PipelineProcess(
            options.pipeline, checkpoint_dir=options.checkpoint_dir, options=options.pipeline_options))
        self._slots = [Slot(make_process()) for _ in range(options.concurrency)]
        self._stopping = threading.Event()
        self._hard_stop = threading.Event()
        self._slot_freed = threading.Event()
        self._claimed = 0
        self._maintenance = Maintenance(store, storage, retention_seconds=options.retention_seconds,
                                        rescue_every=RESCUE_EVERY_SECONDS)
        self._time_budget: float | None = None
        self._started_at = time.monotonic()
        self.outcomes: Counter[str] = Counter()
        self.stop_reason = ""

    # --- signals ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._stopping.is_set():
            self._hard_stop.set()
        self._stopping.set()
        self._slot_freed.set()

    def summary(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "claimed": self._claimed,
            "outcomes": dict(self.outcomes),
            "seconds": round(time.monotonic() - self._started_at, 1),
            "stopped_because": self.stop_reason or "stopped",
        }

    def close(self) -> None:
        """Stop the pipeline processes kept warm between runs."""
        self._stop_processes()

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, *, time_budget_seconds: float | None = None) -> int:
        """0 after a clean stop; 1 when the models could not be loaded (SETUP_FAILED).
        With a time budget, claiming stops once it is spent (a serverless invocation's limit)."""
        self._time_budget = time_budget_seconds
        opts = self._options
        with_db_retries(self._store.register_worker, self.worker_id, host=socket.gethostname(),
                        capacity=opts.concurrency, models=list(opts.model_names), state=WorkerState.STARTING)
        self._stopping.clear()
        self._hard_stop.clear()
        self._claimed, self._started_at, self.outcomes, self.stop_reason = 0, time.monotonic(), Counter(), ""
        try:
            for slot in self._slots:
                slot.process.ensure_started()
        except PipelineError as exc:
            log.error("%s; this worker takes no jobs (check ACESTEP_PIPELINE and ACESTEP_CHECKPOINT_DIR)", exc,
                      extra={"action": "setup_failed", "error": str(exc)})
            with_db_retries(self._store.touch_worker, self.worker_id, state=WorkerState.SETUP_FAILED)
            self._stop_processes()
            return 1
        loaded = sorted({m for slot in self._slots for m in slot.process.models}) or list(opts.model_names)
        with_db_retries(self._store.register_worker, self.worker_id, host=socket.gethostname(),
                        capacity=opts.concurrency, models=loaded, state=WorkerState.READY)
        log.info("worker %s ready", self.worker_id, extra={"action": "worker_ready", "worker_id": self.worker_id})
        beat = threading.Thread(target=self._worker_heartbeat, daemon=True)
        beat.start()
        stop_listening = threading.Event()
        listener = threading.Thread(target=self._forward_cancels, args=(stop_listening,), daemon=True)
        listener.start()
        self._maintenance.start(only=("prune",))  # retention off the claim path
        try:
            with JobWakeups(self._wakeups_url) as wakeups:
                self._loop(wakeups)
        finally:
            self._shutdown()
            stop_listening.set()
            listener.join(timeout=CANCEL_WAIT_SECONDS + 1)
        return 0

    def _forward_cancels(self, stop: threading.Event) -> None:
        """A client's cancel of a running job, heard on the database (NOTIFY), reaches the run that
        holds the job at once; the runs' progress writes see it too, a little later."""
        with CancelNotices(self._wakeups_url) as notices:
            while not stop.is_set():
                for job_id in notices.wait(CANCEL_WAIT_SECONDS):
                    for slot in self._slots:
                        run = slot.run
                        if run is not None:
                            run.request_cancel(job_id)

    def _loop(self, wakeups: JobWakeups) -> None:
        opts = self._options
        idle_since = time.monotonic()
        while not self._stopping.is_set():
            free = [s for s in self._slots if s.run is None]
            jobs = self._claim(len(free))
            for slot, job in zip(free, jobs, strict=False):
                self._start(slot, job)
            busy = any(s.run is not None for s in self._slots)
            if not busy and self._out_of_time():
                self.stop_reason = "time budget spent"
                return
            if busy:
                idle_since = time.monotonic()
            elif opts.once or self._reached_max_jobs():
                self.stop_reason = "queue empty" if opts.once else "max jobs reached"
                return
            elif opts.exit_when_idle is not None and time.monotonic() - idle_since >= opts.exit_when_idle:
                log.info("idle; exiting", extra={"action": "exit_when_idle"})
                self.stop_reason = "idle"
                return
            if jobs and len(jobs) == len(free):
                continue  # every free slot got a job: there may be more, once a slot frees
            if len(jobs) == len(free):  # no free slot: wait for one
                self._slot_freed.wait(opts.poll_seconds)
                self._slot_freed.clear()
            else:  # a free slot and nothing to claim: wait for a new job (NOTIFY) or the poll
                wakeups.wait(min(opts.poll_seconds, opts.exit_when_idle or opts.poll_seconds, 0.25 if busy else opts.poll_seconds))

    def _out_of_time(self) -> bool:
        budget = self._time_budget
        return budget is not None and time.monotonic() - self._started_at >= budget

    def _reached_max_jobs(self) -> bool:
        return self._options.max_jobs is not None and self._claimed >= self._options.max_jobs

    def _claim(self, free: int) -> list[ClaimedJob]:
        if self._options.max_jobs is not None:
            free = min(free, self._options.max_jobs - self._claimed)
        if free <= 0 or self._out_of_time():
            return []
        self._maintenance.tick(only=("rescue",))  # expired leases back in the queue before we look; failures are its own
        try:
            jobs = self._store.claim(self.worker_id, free)
        except StoreError as exc:
            log.warning("claim failed, retrying: %s", exc, extra={"action": "claim_failed", "error": str(exc)})
            time.sleep(1.0)
            return []
        self._claimed += len(jobs)
        return jobs

    def _start(self, slot: Slot, job: ClaimedJob) -> None:
        jobs = [job] + self._claim_batch_mates(job)
        slot.run = JobRun(jobs, store=self._store, storage=self._storage, process=slot.process,
                          worker_id=self.worker_id, heartbeat_seconds=self._options.heartbeat_seconds,
                          timeout_seconds=self._options.job_timeout_seconds,
                          upload_tries=self._options.upload_tries)
        threading.Thread(target=self._run_slot, args=(slot,), daemon=True).start()

    def _claim_batch_mates(self, head: ClaimedJob) -> list[ClaimedJob]:
        """Queued jobs that can share the head job's GPU batch (same batch key), up to the batch size."""
        room = self._options.batch_jobs - 1
        if self._options.max_jobs is not None:
            room = min(room, self._options.max_jobs - self._claimed)
        key = head.request.get("batch_key")
        if room <= 0 or not key:
            return []
        try:
            mates = self._store.claim_batch(self.worker_id, key, room)
        except StoreError:
            return []
        self._claimed += len(mates)
        return mates

    def _run_slot(self, slot: Slot) -> None:
        run = slot.run
        try:
            for job_id, outcome in run.run().items():
                self.outcomes[outcome] += 1
                log.info("job %s: %s", job_id, outcome, extra={"action": "job_done", "job_id": job_id, "outcome": outcome})
        except Exception:  # a bug here must not kill the worker; the leases return the jobs
            log.exception("job run crashed", extra={"action": "job_crashed", "job_ids": [str(j.id) for j in run.jobs]})
        finally:
            slot.run = None
            self._slot_freed.set()

    def _worker_heartbeat(self) -> None:
        while not self._hard_stop.wait(self._options.heartbeat_seconds):
            busy = any(s.run is not None for s in self._slots)
            try:
                self._store.touch_worker(self.worker_id, state=WorkerState.BUSY if busy else WorkerState.READY)
            except DatabaseUnavailable:
                continue

    def _shutdown(self) -> None:
        """Soft stop: running jobs get the grace period, then go back to the queue with their attempt."""
        self._maintenance.stop()
        deadline = time.monotonic() + self._options.shutdown_grace_seconds
        while any(s.run is not None for s in self._slots) and time.monotonic() < deadline:
            if self._hard_stop.wait(0.1):
                break
        for slot in self._slots:
            for job in slot.run.jobs if slot.run is not None else []:
                try:
                    with_db_retries(self._store.release, job, self.worker_id, refund=True)
                    log.info("released job %s on shutdown", job.id, extra={"action": "release", "job_id": str(job.id)})
                except (JobLost, StoreError):
                    pass  # already finished or taken over: nothing of ours to give back
        if not self._options.keep_warm:
            self._stop_processes()
        self._hard_stop.set()
        try:
            self._store.remove_worker(self.worker_id)
        except StoreError:
            pass  # the row just goes stale; /health ignores stale workers

    def _stop_processes(self) -> None:
        for slot in self._slots:
            slot.process.stop()
