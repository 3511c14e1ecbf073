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
from uuid import UUID
from dataclasses import dataclass
from pathlib import Path

from db import DatabaseUnavailable, JobLost, JobStore, JobWakeups, StoreError, WorkerState
from db.cancel_notices import CancelNotices
from db.store import ClaimedJob
from handler import healthcheck
from handler.backends import build_storage, build_store
from handler.maintenance import Maintenance
from handler.metrics import WorkerMetrics
from handler.settings import Settings
from handler.storage import ObjectStorage
from handler.worker.job_run import JobRun, about, with_db_retries
from handler.worker.pipeline_process import PipelineError, PipelineProcess
from pipeline.contract import LM_PREFIX, PipelineOptions

log = logging.getLogger(__name__)

RESCUE_EVERY_SECONDS = 5.0
CANCEL_WAIT_SECONDS = 1.0  # how long the cancel listener blocks before it looks at its stop flag
BUDGET_RESERVE_SECONDS = 15.0  # of a time budget: kept for handing running jobs back and returning
DB_OUTAGE_SECONDS = 30.0  # a run with nothing to do that cannot reach the database gives up after this


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
    storage_patience_seconds: float = 300.0  # and on for this long (within the job's deadline)
    poll_seconds: float = 5.0
    # The DiTs and LMs this worker is configured to serve, registered before its pipeline loads (a
    # scale-from-zero fleet's rows say what it will serve). Once loaded, it registers and claims by
    # what the pipeline reports it serves (its `models`); a pipeline that reports nothing (a test
    # fake) claims every job.
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
        "storage_patience_seconds": settings.storage_patience_seconds,
        "retention_seconds": settings.retention_seconds,
        "model_names": configured_models(settings),
    }
    return Worker(
        build_store(settings, settings.database_url, worker=True), build_storage(settings), settings.database_url,
        WorkerOptions(**(defaults | options)),
    )


def configured_models(settings: Settings) -> tuple[str, ...]:
    """What a worker of these settings serves, before it loads: ACESTEP_DIT_MODEL and
    ACESTEP_DIT_MODELS, then the LMs of ACESTEP_LM_MODELS (empty: every LM folder in the checkpoint
    directory) and ACESTEP_LM_MODEL."""
    lms = [name.strip() for name in settings.lm_models.split(",") if name.strip()]
    if not lms and settings.checkpoint_dir is not None and settings.checkpoint_dir.is_dir():
        lms = sorted(p.name for p in settings.checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(LM_PREFIX))
    if settings.lm_model:
        lms.append(settings.lm_model)
    return tuple(dict.fromkeys([*settings.served_dit_models(), *lms]))


def claim_filter(served: list[str] | tuple[str, ...]) -> tuple[list[str] | None, list[str] | None]:
    """(DiTs, LMs) a worker serving `served` passes to its claims; (None, None), any job, when it
    declares nothing."""
    if not served:
        return None, None
    return [m for m in served if not m.startswith(LM_PREFIX)], [m for m in served if m.startswith(LM_PREFIX)]


class Slot:
    """A pipeline process and the job it is running, if any."""

    def __init__(self, process: PipelineProcess):
        self.process = process
        self.run: JobRun | None = None


class Worker:
    def __init__(self, store: JobStore, storage: ObjectStorage, wakeups_url: str, options: WorkerOptions,
                 *, make_process: Callable[[], PipelineProcess] | None = None, metrics: WorkerMetrics | None = None):
        """`make_process` builds each slot's pipeline process (default: a PipelineProcess child as
        `options` say; tests give an in-process stand-in with the same methods). `metrics`: where
        claims and runs are counted (default: a registry of this worker's own; the CLI serves it on
        ACESTEP_WORKER_METRICS_PORT)."""
        self.metrics = metrics or WorkerMetrics()
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
        self._deadline: float | None = None  # time.monotonic() by which a budgeted run returns
        self._reserve = 0.0
        self._started_at = time.monotonic()
        self._loader: threading.Thread | None = None  # loads the models; may outlive a budgeted run
        self._load_error: PipelineError | None = None
        self._only: UUID | None = None  # the one job this run may claim
        self._only_tried = False
        self._db_down_since: float | None = None
        self._dits: list[str] | None = None  # what the claims ask for (claim_filter); None: any
        self._lms: list[str] | None = None
        self._job_seconds: float | None = None  # mean wall time of the runs this worker finished
        self._runs_timed = 0
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.stop_reason = ""

    # --- signals ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.request_stop()

    def request_stop(self) -> None:
        """Soft stop (SIGTERM, a platform's stop signal): claim nothing more, give running jobs the
        grace period, then hand them back to the queue. A second request stops at once."""
        if self._stopping.is_set():
            self._hard_stop.set()
        self._stopping.set()
        self._slot_freed.set()

    def summary(self) -> dict:
        """What the last `run` did; `error` is set when it ended for a reason other than running
        out of work, time or a stop request (the jobs it could not finish are back in the queue, or
        return there when their lease expires)."""
        return {
            "worker_id": self.worker_id,
            "claimed": self._claimed,
            "outcomes": {getattr(outcome, "value", outcome): n for outcome, n in self.outcomes.items()},
            "seconds": round(time.monotonic() - self._started_at, 1),
            "stopped_because": self.stop_reason or "stopped",
            "error": "; ".join(self.errors) or None,
        }

    def close(self) -> None:
        """Stop the pipeline processes kept warm between runs."""
        self._stop_processes()

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, *, time_budget_seconds: float | None = None, job_id: UUID | None = None) -> int:
        """0 after a clean stop; 1 when the models could not be loaded (SETUP_FAILED); 2 when the
        job database could not be reached (at the start, or for DB_OUTAGE_SECONDS of a run that
        drains or has a budget; a long-lived worker waits for it).

        With a time budget (a serverless invocation's limit) the run returns within it, loading the
        models included: it claims no job that would not end before the last BUDGET_RESERVE_SECONDS
        (judged by how long this worker's runs took), and jobs still running then go back to the
        queue. A load that outlasts the budget goes on for the next run of this worker. With
        `job_id`, the run claims that job only, if it is claimable, and returns once it is done."""
        opts = self._options
        self._started_at = time.monotonic()
        budget = time_budget_seconds
        self._deadline = None if budget is None else self._started_at + budget
        self._reserve = 0.0 if budget is None else min(BUDGET_RESERVE_SECONDS, 0.2 * budget)
        self._only, self._only_tried, self._db_down_since = job_id, False, None
        self._stopping.clear()
        self._hard_stop.clear()
        self._claimed, self.outcomes, self.errors, self.stop_reason = 0, Counter(), [], ""
        try:
            with_db_retries(self._store.register_worker, self.worker_id, host=socket.gethostname(),
                            capacity=opts.concurrency, models=list(opts.model_names), state=WorkerState.STARTING)
        except DatabaseUnavailable as exc:
            self.stop_reason = "database unavailable"
            self.errors.append(f"the job database is unreachable: {exc}")
            return 2
        try:
            if not self._load_models():
                self.stop_reason = "time budget spent loading the models"
                return 0
        except PipelineError as exc:
            log.error("%s; this worker takes no jobs (check ACESTEP_PIPELINE and ACESTEP_CHECKPOINT_DIR)", exc,
                      extra={"action": "setup_failed", "worker_id": self.worker_id, "error": str(exc)})
            self.stop_reason = "setup failed"
            self.errors.append(str(exc))
            try:
                with_db_retries(self._store.touch_worker, self.worker_id, state=WorkerState.SETUP_FAILED)
            except DatabaseUnavailable:
                pass
            self._stop_processes()
            return 1
        reported = sorted({m for slot in self._slots for m in slot.process.models})
        self._dits, self._lms = claim_filter(reported)
        loaded = reported or list(opts.model_names)
        try:
            with_db_retries(self._store.register_worker, self.worker_id, host=socket.gethostname(),
                            capacity=opts.concurrency, models=loaded, state=WorkerState.READY)
        except DatabaseUnavailable as exc:  # the claims below find out whether it lasts
            log.warning("could not register as ready: %s", exc, extra={"action": "register_failed", "worker_id": self.worker_id})
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
        return 2 if self.stop_reason == "database unavailable" else 0

    def _load_models(self) -> bool:
        """Start every slot's pipeline process (loading the models) on a thread of its own; True
        once all are ready, False if the budget ran out first (the load goes on). Raises the load's
        PipelineError."""
        if self._loader is None:
            self._load_error = None
            self._loader = threading.Thread(target=self._start_processes, daemon=True, name="model-loader")
            self._loader.start()
        self._loader.join(None if self._deadline is None else max(0.0, self._release_at() - time.monotonic()))
        if self._loader.is_alive():
            return False
        self._loader = None
        if self._load_error is not None:
            raise self._load_error
        return True

    def _start_processes(self) -> None:
        try:
            for slot in self._slots:
                slot.process.ensure_started()
        except PipelineError as exc:
            self._load_error = exc

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
            if self._deadline is not None and time.monotonic() >= self._release_at():
                self.stop_reason = "time budget spent"
                return
            free = [s for s in self._slots if s.run is None]
            jobs = self._claim(len(free))
            for slot, job in zip(free, jobs, strict=False):
                self._start(slot, job)
            busy = any(s.run is not None for s in self._slots)
            if not busy and self._out_of_time():
                self.stop_reason = "time budget spent"
                return
            if not busy and self._only is not None and self._only_tried:
                self.stop_reason = "job done" if self._claimed else "job not claimable"
                return
            if busy:
                idle_since = time.monotonic()
            elif self._db_down_since is not None and (opts.once or self._deadline is not None):
                # a failed claim says nothing about the queue: keep trying, within limits
                if time.monotonic() - self._db_down_since >= DB_OUTAGE_SECONDS:
                    self.stop_reason = "database unavailable"
                    self.errors.append(f"the job database was unreachable for {DB_OUTAGE_SECONDS:.0f} s")
                    return
                continue
            elif opts.once or self._reached_max_jobs():
                self.stop_reason = "queue empty" if opts.once else "max jobs reached"
                return
            elif opts.exit_when_idle is not None and time.monotonic() - idle_since >= opts.exit_when_idle:
                log.info("idle; exiting", extra={"action": "exit_when_idle", "worker_id": self.worker_id})
                self.stop_reason = "idle"
                return
            if jobs and len(jobs) == len(free):
                continue  # every free slot got a job: there may be more, once a slot frees
            if len(jobs) == len(free):  # no free slot: wait for one
                self._slot_freed.wait(self._capped(opts.poll_seconds))
                self._slot_freed.clear()
            else:  # a free slot and nothing to claim: wait for a new job (NOTIFY) or the poll
                wakeups.wait(self._capped(min(opts.poll_seconds, opts.exit_when_idle or opts.poll_seconds,
                                              0.25 if busy else opts.poll_seconds)))

    def _release_at(self) -> float:
        """When a budgeted run hands its running jobs back and returns."""
        return self._deadline - self._reserve

    def _capped(self, seconds: float) -> float:
        """A wait that ends by the release time of a budgeted run."""
        if self._deadline is None:
            return seconds
        return max(0.0, min(seconds, self._release_at() - time.monotonic()))

    def _out_of_time(self) -> bool:
        """No time left in the budget for another job as long as this worker's runs take."""
        if self._deadline is None:
            return False
        return time.monotonic() + (self._job_seconds or 0.0) >= self._release_at()

    def _reached_max_jobs(self) -> bool:
        return self._options.max_jobs is not None and self._claimed >= self._options.max_jobs

    def _claim(self, free: int) -> list[ClaimedJob]:
        if self._options.max_jobs is not None:
            free = min(free, self._options.max_jobs - self._claimed)
        if free <= 0 or self._out_of_time() or (self._only is not None and self._only_tried):
            return []
        self._maintenance.tick(only=("rescue",))  # expired leases back in the queue before we look; failures are its own
        try:
            if self._only is not None:
                job = self._store.claim_job(self.worker_id, self._only, dits=self._dits, lms=self._lms)
                self._only_tried = True
                jobs = [job] if job is not None else []
            else:
                jobs = self._store.claim(self.worker_id, free, dits=self._dits, lms=self._lms)
        except StoreError as exc:
            log.warning("claim failed, retrying: %s", exc,
                        extra={"action": "claim_failed", "worker_id": self.worker_id, "error": str(exc)})
            if self._db_down_since is None:
                self._db_down_since = time.monotonic()
            time.sleep(self._capped(1.0))
            return []
        self._db_down_since = None
        self._claimed += len(jobs)
        self._claimed_jobs(jobs)
        return jobs

    def _claimed_jobs(self, jobs: list[ClaimedJob]) -> None:
        """Count and log each claimed job: its attempt, and how long a first attempt waited."""
        for job in jobs:
            waited = self.metrics.claimed(job, lease_seconds=self._store.lease_seconds)
            log.info("claimed job %s (attempt %d)", job.id, job.attempt,
                     extra=about(job, self.worker_id, "job_claimed", model=job.model,
                                 queued_seconds=None if waited is None else round(waited, 3)))

    def _start(self, slot: Slot, job: ClaimedJob) -> None:
        jobs = [job] + self._claim_batch_mates(job)
        slot.run = JobRun(jobs, store=self._store, storage=self._storage, process=slot.process,
                          worker_id=self.worker_id, heartbeat_seconds=self._options.heartbeat_seconds,
                          timeout_seconds=self._options.job_timeout_seconds,
                          upload_tries=self._options.upload_tries,
                          storage_patience_seconds=self._options.storage_patience_seconds, metrics=self.metrics)
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
            mates = self._store.claim_batch(self.worker_id, key, room, dits=self._dits, lms=self._lms)
        except StoreError:
            return []
        self._claimed += len(mates)
        self._claimed_jobs(mates)
        return mates

    def _run_slot(self, slot: Slot) -> None:
        run = slot.run
        began = time.monotonic()
        try:
            jobs = {str(job.id): job for job in run.jobs}
            for job_id, outcome in run.run().items():
                self.outcomes[outcome] += 1
                log.info("job %s: %s", job_id, outcome, extra=about(jobs[job_id], self.worker_id, "job_done", outcome=outcome))
            self._runs_timed += 1
            spent = time.monotonic() - began
            self._job_seconds = spent if self._job_seconds is None else self._job_seconds + (spent - self._job_seconds) / self._runs_timed
        except Exception as exc:  # a bug or an outage must not kill the worker; the leases return the jobs
            log.exception("job run crashed", extra=about(run.jobs, self.worker_id, "job_crashed"))
            self.errors.append(f"a run of job(s) {', '.join(str(j.id) for j in run.jobs)} could not finish "
                               f"({exc}); the job goes back to the queue when its lease expires")
        finally:
            slot.run = None
            self._slot_freed.set()

    def _worker_heartbeat(self) -> None:
        healthcheck.beat()  # the container's health check reads this file
        while not self._hard_stop.wait(self._options.heartbeat_seconds):
            busy = any(s.run is not None for s in self._slots)
            try:
                self._store.touch_worker(self.worker_id, state=WorkerState.BUSY if busy else WorkerState.READY)
            except DatabaseUnavailable:
                continue
            healthcheck.beat()

    def _shutdown(self) -> None:
        """Soft stop: running jobs get the grace period (within a budget: half its reserve), then go
        back to the queue with their attempt, and their pipeline runs stop."""
        self._maintenance.stop()
        grace = self._options.shutdown_grace_seconds
        if self._deadline is not None:
            grace = max(0.0, min(grace, self._deadline - self._reserve / 2 - time.monotonic()))
        deadline = time.monotonic() + grace
        while any(s.run is not None for s in self._slots) and time.monotonic() < deadline:
            if self._hard_stop.wait(0.1):
                break
        for slot in self._slots:
            run = slot.run
            for job in run.jobs if run is not None else []:
                try:
                    with_db_retries(self._store.release, job, self.worker_id, refund=True)
                    log.info("released job %s on shutdown", job.id, extra=about(job, self.worker_id, "release"))
                except (JobLost, StoreError):
                    pass  # already finished or taken over (or the lease brings it back)
            if run is not None:
                run.abandon()
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
