"""One claimed job on one pipeline process: heartbeat, run, upload, and the fenced outcome."""

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from db import DatabaseUnavailable, JobLost, JobStatus, JobStore, StoreError
from db.store import ClaimedJob
from handler.storage import AUDIO_CONTENT_TYPES, ObjectNotFound, ObjectStorage, StorageError, StorageUnavailable
from handler.worker.pipeline_process import Canceled, OutOfMemory, PipelineError, PipelineProcess
from pipeline.contract import INPUT_PATH_FIELDS, RESULT_INFO_FIELDS, GenerationRequest, StoredRequestError, request_from_row

log = logging.getLogger(__name__)

DB_RETRIES = 5
LOST = "lost"  # an outcome beside the JobStatus a run ends a job in: the job was no longer ours


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
    """The result contract rendered by handler/http/job_view.py (storable: see `storable`)."""
    info = storable(info)
    result = {
        "audio_keys": keys,
        "generation_info": info.get(
            "generation_info", f"Steps: {request.inference_steps}, Scale: {request.guidance_scale}"
        ),
        "status_message": "Generation completed successfully!",
        "seed_value": str(info.get("seed_value", "")),
    }
    for name in RESULT_INFO_FIELDS:
        if info.get(name) is not None:
            result[name] = info[name]
    return result


def with_db_retries(call, *args, **kwargs):
    """Retry a store call through a dropped connection (the pool reconnects on the next try)."""
    for attempt in range(DB_RETRIES):
        try:
            return call(*args, **kwargs)
        except DatabaseUnavailable:
            if attempt == DB_RETRIES - 1:
                raise
            time.sleep(min(0.2 * 2**attempt, 3.0))


class JobRun:
    """One claimed job, or several that share one GPU batch; each ends on its own, fenced."""

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
    ):
        self.jobs = jobs
        self._upload_tries = upload_tries
        self._store = store
        self._storage = storage
        self._process = process
        self._worker_id = worker_id
        self._heartbeat_seconds = heartbeat_seconds
        self._timeout = timeout_seconds
        self._stage, self._progress = "claimed", 0.0
        self._done = threading.Event()
        self._lost: set = set()
        self._cancel_requested: set = set()

    def _on_progress(self, stage: str, fraction: float) -> None:
        self._stage, self._progress = stage, min(max(fraction, 0.0), 1.0)

    def _heartbeat(self) -> None:
        while not self._done.wait(self._heartbeat_seconds):
            for job in self.jobs:
                if job.id in self._lost:
                    continue
                try:
                    if self._store.heartbeat(job, self._worker_id, stage=self._stage, progress=self._progress):
                        self._cancel_requested.add(job.id)
                except DatabaseUnavailable:
                    break  # the lease outlasts a few missed beats; the next round reconnects
                except JobLost:
                    self._lost.add(job.id)
            if all(job.id in self._lost | self._cancel_requested for job in self.jobs):
                self._process.cancel()  # nobody waits for this batch any more

    def run(self) -> dict[str, str]:
        """Run to an outcome per job id: the JobStatus it left the job in (succeeded, failed, queued,
        canceled), or LOST."""
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        out_dir = Path(tempfile.mkdtemp(prefix="acestep-job-"))
        try:
            return self._run(self.jobs, out_dir)
        finally:
            self._done.set()
            beat.join(timeout=5)
            shutil.rmtree(out_dir, ignore_errors=True)

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
        return request.model_copy(update=files)

    def _run(self, jobs: list[ClaimedJob], out_dir: Path) -> dict[str, str]:
        if any(job.request.get("lm_task") for job in jobs):  # never batched; one after another
            return {str(job.id): self._run_lm_task(job, job.request["lm_task"]) if job.request.get("lm_task")
                    else self._run([job], out_dir)[str(job.id)] for job in jobs}
        requests = []
        for job in jobs:
            try:
                requests.append(self._request(job, out_dir))
            except StoredRequestError as exc:
                return {str(j.id): self._fail(j, str(exc), retryable=False) for j in jobs}
            except ObjectNotFound as exc:
                return {str(j.id): self._fail(j, f"an input audio file is gone from storage: {exc}", retryable=False) for j in jobs}
            except StorageError as exc:
                return {str(j.id): self._fail(j, f"could not read the input audio: {exc}", retryable=True) for j in jobs}
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                finished = self._process.run(requests, deadline=deadline, on_progress=self._on_progress, out_dir=out_dir)
                break
            except Canceled:
                return {str(job.id): self._end_canceled(job) for job in jobs}
            except OutOfMemory as exc:
                if len(jobs) > 1:  # too big together: one job at a time
                    outcomes: dict[str, str] = {}
                    for job in jobs:
                        outcomes |= self._run([job], out_dir)
                    return outcomes
                if requests[0].items <= 1:
                    return {str(jobs[0].id): self._fail(jobs[0], f"out of memory even with one song per batch: {exc}", retryable=True)}
                requests[0] = requests[0].model_copy(update={"batch_size": max(1, requests[0].items // 2)})
                log.warning("out of memory; retrying with a smaller batch",
                            extra={"action": "oom_retry", "job_id": str(jobs[0].id), "batch_size": requests[0].items})
            except PipelineError as exc:
                return {str(job.id): self._fail(job, str(exc), retryable=exc.retryable) for job in jobs}
        self._on_progress("uploading", 0.98)
        return {
            str(job.id): self._finish(job, request, result)
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
            return self._fail(job, str(exc), retryable=exc.retryable)
        if job.id in self._lost:
            return LOST
        if job.id in self._cancel_requested:
            return self._end_canceled(job)
        result = {"audio_keys": [], "generation_info": f"LM task {task}", "status_message": "", "seed_value": "",
                  "lm_result": storable(answer)}
        return self._complete(job, result)

    def _finish(self, job: ClaimedJob, request: GenerationRequest, finished) -> str:
        if job.id in self._lost:
            return LOST
        if job.id in self._cancel_requested:
            return self._end_canceled(job)
        try:
            keys = self._upload(job, finished.files, request.audio_format)
        except StorageError as exc:
            return self._fail(job, f"could not store the audio: {exc}", retryable=True)
        return self._complete(job, result_document(request, keys, finished.info))

    def _upload(self, job: ClaimedJob, files: list[Path], fmt: str) -> list[str]:
        keys = []
        for index, path in enumerate(files):
            key = output_key(job, index, fmt)
            self._with_storage_retries(self._put_file, key, path, AUDIO_CONTENT_TYPES[fmt])
            keys.append(key)
        return keys

    def _with_storage_retries(self, call, *args) -> None:
        """`call(*args)`, retried with doubling backoff while storage is unavailable (upload_tries times)."""
        for attempt in range(self._upload_tries):
            try:
                return call(*args)
            except StorageUnavailable:
                if attempt == self._upload_tries - 1:
                    raise
                time.sleep(min(0.5 * 2**attempt, 10.0))

    def _put_file(self, key: str, path: Path, content_type: str) -> None:
        with path.open("rb") as data:
            self._storage.put(key, data, content_type)

    def _download(self, key: str, target: Path) -> None:
        with self._storage.open(key) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)

    def _complete(self, job: ClaimedJob, result: dict[str, Any]) -> str:
        try:
            with_db_retries(self._store.complete, job, self._worker_id, result)
            return JobStatus.SUCCEEDED
        except JobLost:
            # A retried commit may have landed before the connection dropped: then it is ours.
            row = with_db_retries(self._store.get, job.id)
            if row["status"] == JobStatus.SUCCEEDED and row["result"] == result:
                return JobStatus.SUCCEEDED
            self._storage.delete_prefix(f"jobs/{job.id}/attempt-{job.attempt}/")
            log.warning("job %s lost before completion; result dropped", job.id, extra={"action": "job_lost"})
            return LOST
        except DatabaseUnavailable:
            raise  # the lease brings the job back once the database does
        except StoreError as exc:  # the database refused this result: fail the attempt now, not at lease expiry
            self._storage.delete_prefix(f"jobs/{job.id}/attempt-{job.attempt}/")
            return self._fail(job, f"could not store the result: {exc}", retryable=True)

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool) -> str:
        try:
            return with_db_retries(self._store.fail, job, self._worker_id, error, retryable=retryable)
        except JobLost:
            return LOST

    def _end_canceled(self, job: ClaimedJob) -> str:
        try:
            with_db_retries(self._store.finish_canceled, job, self._worker_id)
            return JobStatus.CANCELED
        except JobLost:
            return LOST
