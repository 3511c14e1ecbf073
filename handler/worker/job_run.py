"""One claimed job on one pipeline process: heartbeat, run, upload, and the fenced outcome."""

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from db import DatabaseUnavailable, JobLost, JobStatus, JobStore, StoreError
from db.store import ClaimedJob
from handler.metrics import WorkerMetrics
from handler.storage import AUDIO_CONTENT_TYPES, ObjectNotFound, ObjectStorage, StorageError, StorageUnavailable
from handler.worker.adapters import localize_lora
from handler.worker.pipeline_process import (Canceled, OutOfMemory, PipelineCrashed, PipelineError, PipelineProcess,
                                             PipelineTimeout)
from pipeline.contract import INPUT_PATH_FIELDS, RESULT_INFO_FIELDS, GenerationRequest, StoredRequestError, request_from_row, stage_progress

log = logging.getLogger(__name__)

DB_RETRIES = 5
# A finished job's outcome waits for the database to come back as long as the lease allows (at most
# this long): the fenced write stays valid until the job is rescued, so a result made during a
# database restart is kept instead of being recomputed.
OUTCOME_PATIENCE_SECONDS = 3600.0
LOST = "lost"  # an outcome beside the JobStatus a run ends a job in: the job was no longer ours


def about(jobs: ClaimedJob | Sequence[ClaimedJob], worker_id: str, event: str, **fields: Any) -> dict[str, Any]:
    """The `extra` of a log line about a job: its event name, job_id, attempt and worker_id (for a
    run of several jobs, job_ids and attempts instead; one job reads as a job), and `fields`."""
    jobs = [jobs] if isinstance(jobs, ClaimedJob) else list(jobs)
    if len(jobs) == 1:
        ids: dict[str, Any] = {"job_id": str(jobs[0].id), "attempt": jobs[0].attempt}
    else:
        ids = {"job_ids": [str(j.id) for j in jobs], "attempts": [j.attempt for j in jobs]}
    return {"action": event, **ids, "worker_id": worker_id, **fields}


def failure_reason(exc: PipelineError) -> str:
    """A pipeline error's reason label (acestep_job_failures_total)."""
    if isinstance(exc, OutOfMemory):
        return "out_of_memory"
    if isinstance(exc, PipelineTimeout):
        return "timeout"
    if isinstance(exc, PipelineCrashed):
        return "crashed"
    return "pipeline_error"


def output_key(job: ClaimedJob, index: int, fmt: str) -> str:
    """Per attempt, so a stale attempt can never overwrite the files of the attempt that won."""
    return f"jobs/{job.id}/attempt-{job.attempt}/output-{index}.{fmt}"


def storable(value: Any) -> Any:
    """`value` with NUL characters taken out of every string: Postgres text and jsonb cannot hold
    them, and a random or misbehaving LM can write one into its caption or genres."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def result_document(request: GenerationRequest, keys: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """The result contract rendered by handler/http/job_view.py (storable: see `storable`), in the
    spec's example form: generation_info "Steps: 8, Scale: 7.0, Seeds: ..., <what the pipeline says
    it ran>" and status_message "✅ Generation completed successfully!". `genres` comes from the
    pipeline's info, else from the LM's metadata under `metas`."""
    info = storable(info)
    seeds = str(info.get("seed_value", ""))
    details = [f"Steps: {request.inference_steps}", f"Scale: {float(request.guidance_scale)}"]
    if seeds:
        details.append(f"Seeds: {seeds}")
    if info.get("generation_info"):
        details.append(str(info["generation_info"]))
    result = {
        "audio_keys": keys,
        "generation_info": ", ".join(details),
        "status_message": "✅ Generation completed successfully!",
        "seed_value": seeds,
    }
    if info.get("status_message"):  # the analysis modes say what they did
        result["status_message"] = str(info["status_message"])
    for name in RESULT_INFO_FIELDS:
        if info.get(name) is not None:
            result[name] = info[name]
    genres = (info.get("metas") or {}).get("genres") if isinstance(info.get("metas"), dict) else None
    if "genres" not in result and genres not in (None, "", "N/A"):
        result["genres"] = genres
    return result


def with_db_retries(call, *args, patience: float = 0.0, **kwargs):
    """Retry a store call through a dropped connection (the pool reconnects on the next try):
    DB_RETRIES times, and on for `patience` seconds in all (a database restart)."""
    give_up = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            return call(*args, **kwargs)
        except DatabaseUnavailable:
            attempt += 1
            if attempt >= DB_RETRIES and time.monotonic() >= give_up:
                raise
            time.sleep(min(0.2 * 2 ** min(attempt - 1, 4), 3.0))


class JobRun:
    """One claimed job, or several that share one GPU batch; each ends on its own, fenced.

    While the pipeline runs, a beat thread writes its progress to the rows as it changes (at most
    every PROGRESS_SECONDS) and otherwise extends the leases every `heartbeat_seconds`; a cancel
    request (returned by those writes, or announced by the worker's listener through
    `request_cancel`) stops the pipeline at its next report once no job of the run is wanted. The
    stage reports also time the stages; each job's completion stores its share of them.

    `metrics` (the worker's) sees each job's outcome and time from the claim, each failed attempt's
    reason, and a succeeded job's stage timings."""

    PROGRESS_SECONDS = 0.5

    def __init__(
        self,
        jobs: list[ClaimedJob],
        *,
        store: JobStore,
        storage: ObjectStorage,
        process: PipelineProcess,
        worker_id: str,
        heartbeat_seconds: float,
        timeout_seconds: float,
        upload_tries: int = 6,
        storage_patience_seconds: float = 0.0,
        metrics: WorkerMetrics | None = None,
    ):
        self.jobs = jobs
        self._metrics = metrics
        self._ended_at: dict = {}  # job id -> time.monotonic() its outcome was written
        self._upload_tries = upload_tries
        self._storage_patience = storage_patience_seconds
        self._store = store
        self._storage = storage
        self._process = process
        self._worker_id = worker_id
        self._heartbeat_seconds = heartbeat_seconds
        self._timeout = timeout_seconds
        self._where = ("claimed", 0.0)  # (stage, progress), replaced whole: the beat thread reads it
        self._done = threading.Event()
        self._changed = threading.Event()  # wakes the beat thread: new progress, a duration to re-price, the end
        self._lock = threading.Lock()  # the two sets below are written by three threads
        self._lost: set = set()
        self._cancel_requested: set = set()
        self._audio_seconds: float | None = None  # per song, once the pipeline says
        self._reprice_to: float | None = None
        self._began = time.monotonic()
        self._restart_clock()

    # ---- progress, cancel and re-pricing (pipe-reading thread -> beat thread) -------------------

    def _on_progress(self, stage: str, fraction: float, **facts: Any) -> None:
        self._time_stage(stage)
        self._where = (stage, min(max(fraction, 0.0), 1.0))
        seconds = facts.get("audio_seconds")
        if seconds is not None:
            self._audio_seconds = float(seconds)
            if any(self._requested_seconds(job) != self._audio_seconds for job in self.jobs):
                self._reprice_to = self._audio_seconds
        self._changed.set()

    @staticmethod
    def _requested_seconds(job: ClaimedJob) -> float | None:
        seconds = job.request.get("audio_duration")
        return float(seconds) if seconds is not None else None

    def request_cancel(self, job_id) -> None:
        """A client asked to cancel `job_id` (the worker's listener heard it, or a write returned it)."""
        if any(job.id == job_id for job in self.jobs):
            with self._lock:
                self._cancel_requested.add(job_id)
            self._cancel_if_unwanted()

    def abandon(self) -> None:
        """The worker handed these jobs back (shutdown): write nothing more to their rows and stop
        the pipeline at its next report."""
        with self._lock:
            self._lost.update(job.id for job in self.jobs)
        self._cancel_if_unwanted()

    def _cancel_if_unwanted(self) -> None:
        with self._lock:
            unwanted = all(job.id in self._lost or job.id in self._cancel_requested for job in self.jobs)
        if unwanted:
            self._process.cancel()  # nobody waits for this run any more

    def _marked(self, job: ClaimedJob, kind: set) -> bool:
        with self._lock:
            return job.id in kind

    def _beat(self) -> None:
        written, last = None, time.monotonic() - self.PROGRESS_SECONDS  # the first report goes out at once
        while True:
            self._changed.wait(max(0.0, last + self._heartbeat_seconds - time.monotonic()))
            if self._done.wait(max(0.0, last + self.PROGRESS_SECONDS - time.monotonic())):
                return
            self._changed.clear()
            self._reprice()
            where = self._where
            if where != written or time.monotonic() - last >= self._heartbeat_seconds:
                self._write_progress(*where)
                written, last = where, time.monotonic()

    def _write_progress(self, stage: str, progress: float) -> None:
        """Progress to every row still ours, extending their leases; records cancel requests."""
        for job in self.jobs:
            if self._marked(job, self._lost):
                continue
            try:
                if self._store.heartbeat(job, self._worker_id, stage=stage, progress=progress):
                    with self._lock:
                        self._cancel_requested.add(job.id)
            except JobLost:
                with self._lock:
                    self._lost.add(job.id)
            except StoreError as exc:  # the lease outlasts a few missed writes; the next round retries
                log.warning("progress write failed: %s", exc, extra=about(job, self._worker_id, "heartbeat_failed"))
                break
        self._cancel_if_unwanted()

    def _reprice(self) -> None:
        """The seconds per song the pipeline learned, on the rows whose request said otherwise. A
        failed re-price only leaves the estimate on the old duration; it never fails the job."""
        seconds, self._reprice_to = self._reprice_to, None
        if seconds is None:
            return
        for job in self.jobs:
            if self._marked(job, self._lost) or self._requested_seconds(job) == seconds:
                continue
            try:
                self._store.reprice(job, self._worker_id, seconds)
            except JobLost:
                with self._lock:
                    self._lost.add(job.id)
            except StoreError as exc:
                log.warning("re-pricing job %s failed: %s", job.id, exc, extra=about(job, self._worker_id, "reprice_failed"))

    # ---- stage timings --------------------------------------------------------------------------

    def _restart_clock(self) -> None:
        """Time from now on as "claimed" until the first stage report."""
        self._stage_seconds: dict[str, float] = {}
        self._timed_stage, self._stage_since = "claimed", time.monotonic()

    def _time_stage(self, stage: str) -> None:
        """A stage runs from its first report to the first report of another stage."""
        if stage != self._timed_stage:
            now = time.monotonic()
            self._stage_seconds[self._timed_stage] = self._stage_seconds.get(self._timed_stage, 0.0) + now - self._stage_since
            self._timed_stage, self._stage_since = stage, now

    def _timings(self, job: ClaimedJob, share: int) -> dict[str, Any]:
        """What the run cost this job: each stage so far (the current one up to now) split over the
        `share` jobs that ran together, and the seconds per song made."""
        stages = dict(self._stage_seconds)
        stages[self._timed_stage] = stages.get(self._timed_stage, 0.0) + time.monotonic() - self._stage_since
        seconds = self._audio_seconds if self._audio_seconds is not None else self._requested_seconds(job)
        lm_task = job.request.get("lm_task")
        shape = (("lm_task", lm_task.get("task")) if lm_task else
                 (job.task_type, seconds, int(job.request.get("batch_size") or 1)))
        return {"stages": {stage: round(spent / share, 4) for stage, spent in stages.items()},
                "audio_seconds": seconds, "batch_jobs": share, "cold": self._process.first_run_of(shape)}

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, str]:
        """Run to an outcome per job id: the JobStatus it left the job in (succeeded, failed, queued,
        canceled), or LOST."""
        beat = threading.Thread(target=self._beat, daemon=True)
        beat.start()
        out_dir = Path(tempfile.mkdtemp(prefix="acestep-job-"))
        try:
            outcomes = self._run(self.jobs, out_dir)
            self._observe(outcomes)
            return outcomes
        finally:
            self._done.set()
            self._changed.set()
            beat.join(timeout=5)
            shutil.rmtree(out_dir, ignore_errors=True)

    def _observe(self, outcomes: dict[str, str]) -> None:
        """Each job's outcome and its time from the claim to the write of that outcome."""
        if self._metrics is None:
            return
        now = time.monotonic()
        for job in self.jobs:
            outcome = outcomes.get(str(job.id))
            if outcome is not None:
                self._metrics.finished(job, outcome, self._ended_at.get(job.id, now) - self._began)

    def _request(self, job: ClaimedJob, out_dir: Path) -> GenerationRequest:
        """The job's request as the pipeline runs it: rebuilt from the row once, its audio inputs
        made local files (stored objects downloaded, retried like uploads; server paths as they are)."""
        request = request_from_row(job.request)
        files = {}
        for role, ref in (job.request.get("inputs") or {}).items():
            if "path" in ref:
                files[INPUT_PATH_FIELDS[role]] = ref["path"]
                continue
            target = out_dir / f"{job.id}-input-{role}{Path(ref['key']).suffix}"
            self._with_storage_retries(self._download, ref["key"], target)
            files[INPUT_PATH_FIELDS[role]] = str(target)
        # its LoRA adapters as local folders too (handler/worker/adapters.py)
        return localize_lora(request.model_copy(update=files), job.owner, self._storage, retry=self._with_storage_retries)

    def _one_after_another(self, jobs: list[ClaimedJob], out_dir: Path) -> dict[str, str]:
        """Each job on its own run of the pipeline, timed on its own (the first from the claim)."""
        outcomes: dict[str, str] = {}
        for index, job in enumerate(jobs):
            if index:
                self._restart_clock()
            task = job.request.get("lm_task")
            outcomes |= {str(job.id): self._run_lm_task(job, task)} if task else self._run([job], out_dir)
        return outcomes

    def _run(self, jobs: list[ClaimedJob], out_dir: Path) -> dict[str, str]:
        if any(job.request.get("lm_task") for job in jobs):  # never batched; one after another
            return self._one_after_another(jobs, out_dir)
        requests = []
        for job in jobs:
            try:
                requests.append(self._request(job, out_dir))
            except StoredRequestError as exc:
                return {str(j.id): self._fail(j, str(exc), retryable=False, reason="bad_request") for j in jobs}
            except ObjectNotFound as exc:
                return {str(j.id): self._fail(j, f"an input audio file is gone from storage: {exc}", retryable=False,
                                               reason="input_missing") for j in jobs}
            except StorageError as exc:
                return {str(j.id): self._fail(j, f"could not read the input audio: {exc}", retryable=True,
                                              reason="input_unavailable") for j in jobs}
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                finished = self._process.run(requests, deadline=deadline, on_progress=self._on_progress, out_dir=out_dir)
                break
            except Canceled:
                return {str(job.id): self._end_canceled(job) for job in jobs}
            except OutOfMemory as exc:
                if len(jobs) > 1:  # too big together: one job at a time
                    return self._one_after_another(jobs, out_dir)
                if requests[0].items <= 1:
                    return {str(jobs[0].id): self._fail(jobs[0], f"out of memory even with one song per batch: {exc}",
                                                        retryable=True, reason="out_of_memory")}
                requests[0] = requests[0].model_copy(update={"batch_size": max(1, requests[0].items // 2)})
                log.warning("out of memory; retrying with a smaller batch",
                            extra=about(jobs[0], self._worker_id, "oom_retry", batch_size=requests[0].items))
            except PipelineError as exc:
                return {str(job.id): self._fail(job, str(exc), retryable=exc.retryable, reason=failure_reason(exc))
                        for job in jobs}
        self._on_progress("uploading", stage_progress("uploading", 0.0))
        return {
            str(job.id): self._fail(job, result.error, retryable=result.retryable, reason="pipeline_error")
            if result.error is not None
            else self._finish(job, request, result, share=len(jobs))
            for job, request, result in zip(jobs, requests, finished, strict=True)
        }

    def _run_lm_task(self, job: ClaimedJob, lm_task: dict[str, Any]) -> str:
        """One of the LM's own tasks (a short job behind a synchronous HTTP route): no audio, the
        task's answer is the result, under `lm_result`."""
        task = str(lm_task.get("task", ""))
        try:
            answer = self._process.run_lm_task(task, dict(lm_task.get("params") or {}),
                                               deadline=time.monotonic() + self._timeout, on_progress=self._on_progress)
        except Canceled:
            return self._end_canceled(job)
        except PipelineError as exc:
            return self._fail(job, str(exc), retryable=exc.retryable, reason=failure_reason(exc))
        if self._marked(job, self._lost):
            return LOST
        if self._marked(job, self._cancel_requested):
            return self._end_canceled(job)
        result = {"audio_keys": [], "generation_info": f"LM task {task}", "status_message": "", "seed_value": "",
                  "lm_result": storable(answer)}
        return self._complete(job, result, self._timings(job, 1))

    def _finish(self, job: ClaimedJob, request: GenerationRequest, finished, *, share: int) -> str:
        if self._marked(job, self._lost):
            return LOST
        if self._marked(job, self._cancel_requested):
            return self._end_canceled(job)
        try:
            keys = self._upload(job, finished.files, request.audio_format)
        except StorageError as exc:
            return self._fail(job, f"could not store the audio: {exc}", retryable=True, reason="storage")
        return self._complete(job, result_document(request, keys, finished.info), self._timings(job, share))

    def _upload(self, job: ClaimedJob, files: list[Path], fmt: str) -> list[str]:
        keys = []
        for index, path in enumerate(files):
            key = output_key(job, index, fmt)
            # The made audio is kept through a storage outage: tried on (the beat keeps the lease) for
            # ACESTEP_STORAGE_PATIENCE_SECONDS within the job's deadline, not only `upload_tries` times.
            self._with_storage_retries(self._put_file, key, path, AUDIO_CONTENT_TYPES[fmt],
                                       until=min(time.monotonic() + self._storage_patience, self._began + self._timeout))
            keys.append(key)
        return keys

    def _with_storage_retries(self, call, *args, until: float | None = None) -> None:
        """`call(*args)`, retried with doubling backoff (at most 10 s apart) while storage is
        unavailable: `upload_tries` times, and on until `until` (time.monotonic()) if given."""
        attempt = 0
        while True:
            try:
                return call(*args)
            except StorageUnavailable as exc:
                attempt += 1
                if attempt >= self._upload_tries and (until is None or time.monotonic() >= until):
                    raise
                if attempt == self._upload_tries:
                    log.warning("storage unavailable; retrying until the job's deadline: %s", exc,
                                extra=about(self.jobs, self._worker_id, "storage_retry"))
                time.sleep(min(0.5 * 2 ** min(attempt - 1, 5), 10.0))

    def _put_file(self, key: str, path: Path, content_type: str) -> None:
        with path.open("rb") as data:
            self._storage.put(key, data, content_type)

    def _download(self, key: str, target: Path) -> None:
        with self._storage.open(key) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)

    def _complete(self, job: ClaimedJob, result: dict[str, Any], timings: dict[str, Any]) -> str:
        try:
            with_db_retries(self._store.complete, job, self._worker_id, result, timings=timings,
                            patience=self._outcome_patience())
            self._ended_at[job.id] = time.monotonic()
            if self._metrics is not None:
                self._metrics.stages(job, timings)
            return JobStatus.SUCCEEDED
        except JobLost:
            # A retried commit may have landed before the connection dropped: then it is ours.
            row = with_db_retries(self._store.get, job.id)
            if row["status"] == JobStatus.SUCCEEDED and row["result"] == result:
                return JobStatus.SUCCEEDED
            self._storage.delete_prefix(f"jobs/{job.id}/attempt-{job.attempt}/")
            log.warning("job %s lost before completion; result dropped", job.id,
                        extra=about(job, self._worker_id, "job_lost"))
            return LOST
        except DatabaseUnavailable:
            raise  # the lease brings the job back once the database does
        except StoreError as exc:  # the database refused this result: fail the attempt now, not at lease expiry
            self._storage.delete_prefix(f"jobs/{job.id}/attempt-{job.attempt}/")
            return self._fail(job, f"could not store the result: {exc}", retryable=True, reason="result_refused")

    def _outcome_patience(self) -> float:
        return min(OUTCOME_PATIENCE_SECONDS, float(self._store.lease_seconds))

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool, reason: str) -> str:
        """Record the attempt failed (queued again while attempts and `retryable` allow); `reason`
        names the kind of failure for the metrics and the log."""
        try:
            status = with_db_retries(self._store.fail, job, self._worker_id, error, retryable=retryable,
                                     patience=self._outcome_patience())
        except JobLost:
            return LOST
        self._ended_at[job.id] = time.monotonic()
        if self._metrics is not None:
            self._metrics.failed(job, reason, final=status == JobStatus.FAILED)
        log.warning("job %s attempt %d failed (%s): %s", job.id, job.attempt, reason, error,
                    extra=about(job, self._worker_id, "attempt_failed", reason=reason, retryable=retryable,
                                status=status, error=error))
        return status

    def _end_canceled(self, job: ClaimedJob) -> str:
        try:
            with_db_retries(self._store.finish_canceled, job, self._worker_id)
            self._ended_at[job.id] = time.monotonic()
            return JobStatus.CANCELED
        except JobLost:
            return LOST
