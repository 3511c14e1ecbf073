"""JobRun and Worker in this process, over the real store and local storage, with the pipeline
"process" in-process (tests/fakes/in_process.py: the child's own run logic, no spawn)."""

import dataclasses
import io
import threading
import time
from uuid import UUID

import pytest
import soundfile

from db import JobStatus, WorkerState
from handler.http.inputs import AudioInputs
from handler.http.routes_jobs import new_job
from handler.settings import Settings
from handler.storage import LocalStorage
from handler.worker.job_run import LOST, JobRun
from handler.worker.worker import Worker, WorkerOptions
from pipeline.contract import GenerationRequest
from tests.fakes.in_process import InProcessPipeline


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "objects", secret=b"k" * 32)


def submit(store, *, tweak=None, **fields) -> UUID:
    """Queue a job as the HTTP function would; `tweak(document)` edits the stored request first."""
    job = new_job(GenerationRequest(**fields), AudioInputs(), Settings(_env_file=None))
    if tweak is not None:
        job = dataclasses.replace(job, request=tweak(dict(job.request)))
    return store.submit(job).id


def run_claimed(store, storage, process, limit: int = 1, **options) -> dict[str, str]:
    jobs = store.claim("w-test", limit)
    assert jobs, "nothing was claimable"
    run = JobRun(jobs, store=store, storage=storage, process=process, worker_id="w-test",
                 heartbeat_seconds=options.pop("heartbeat_seconds", 0.05), timeout_seconds=60, **options)
    return run.run()


def test_a_job_runs_to_stored_files_and_a_result(store, storage):
    job_id = submit(store, caption="a calm piano piece", audio_format="wav", batch_size=2, seed=5, use_random_seed=False)
    process = InProcessPipeline()
    assert run_claimed(store, storage, process) == {str(job_id): JobStatus.SUCCEEDED}
    row = store.get(job_id)
    assert row["status"] == JobStatus.SUCCEEDED and len(row["result"]["audio_keys"]) == 2
    for key in row["result"]["audio_keys"]:
        with storage.open(key) as data:
            audio, rate = soundfile.read(io.BytesIO(data.read()))
        assert rate == 48000 and audio.shape[1] == 2
    (message,) = process.received
    (request,) = message.requests
    assert isinstance(request, GenerationRequest)  # rebuilt from the row once, typed
    assert request == GenerationRequest(caption="a calm piano piece", audio_format="wav", batch_size=2, seed=5,
                                        use_random_seed=False, model="acestep-v15-turbo")  # the DiT resolved at submit


def test_a_pipeline_bug_fails_the_job_for_good(store, storage):
    job_id = submit(store, caption="fake:raise")
    assert run_claimed(store, storage, InProcessPipeline()) == {str(job_id): JobStatus.FAILED}
    row = store.get(job_id)
    assert row["status"] == JobStatus.FAILED and "the DiT exploded" in row["error"] and row["attempt"] == 1


def test_out_of_memory_halves_the_batch_until_it_fits(store, storage):
    job_id = submit(store, caption="x", batch_size=4)
    process = InProcessPipeline("tests.fakes.pipelines:oom_when_batched")
    assert run_claimed(store, storage, process) == {str(job_id): JobStatus.SUCCEEDED}
    assert [m.requests[0].batch_size for m in process.received] == [4, 2, 1]
    assert len(store.get(job_id)["result"]["audio_keys"]) == 1


def test_cancel_while_running_ends_the_job_canceled(store, storage):
    job_id = submit(store, caption="x")
    process = InProcessPipeline()
    process.ensure_started()
    process.pipeline.stage_seconds = 0.4
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(run_claimed(store, storage, process)))
    runner.start()
    time.sleep(0.2)
    store.cancel(job_id)
    runner.join(timeout=10)
    assert outcome == {str(job_id): JobStatus.CANCELED}
    assert store.get(job_id)["status"] == JobStatus.CANCELED


def test_a_job_taken_over_is_lost_not_written(store, storage):
    job_id = submit(store, caption="x")
    jobs = store.claim("w-test", 1)
    store.cancel(job_id)  # the row is no longer ours to finish as succeeded
    store.finish_canceled(jobs[0], "w-test")
    run = JobRun(jobs, store=store, storage=storage, process=InProcessPipeline(), worker_id="w-test",
                 heartbeat_seconds=0.05, timeout_seconds=60)
    assert run.run() == {str(job_id): LOST}
    assert store.get(job_id)["result"] is None


def test_a_row_from_an_older_version_with_a_removed_field_still_runs(store, storage, caplog):
    job_id = submit(store, caption="x", tweak=lambda doc: doc | {"use_tiled_decode": True, "constrained_decoding": True})
    process = InProcessPipeline()
    with caplog.at_level("WARNING", logger="pipeline.contract"):
        assert run_claimed(store, storage, process) == {str(job_id): JobStatus.SUCCEEDED}
    assert "constrained_decoding, use_tiled_decode" in caplog.text
    assert not hasattr(process.received[0].requests[0], "use_tiled_decode")


def test_a_row_this_version_cannot_run_fails_at_once_saying_why(store, storage):
    job_id = submit(store, caption="x", tweak=lambda doc: doc | {"vocal_language": "klingon"})
    process = InProcessPipeline()
    assert run_claimed(store, storage, process) == {str(job_id): JobStatus.FAILED}
    row = store.get(job_id)
    assert "not valid for this worker version" in row["error"] and "vocal_language" in row["error"]
    assert row["attempt"] == 1 and process.received == []  # never reached the pipeline, never retried


def worker(store, storage, db_url, make_process, **options) -> Worker:
    opts = WorkerOptions(pipeline="unused", once=True, heartbeat_seconds=0.1, poll_seconds=0.1, **options)
    return Worker(store, storage, db_url, opts, make_process=make_process)


def test_worker_drains_the_queue_and_reports_what_its_pipeline_loaded(store, storage, db_url):
    ids = [submit(store, caption=f"song {i}") for i in range(3)]
    processes = []

    def make_process():
        processes.append(InProcessPipeline())
        return processes[-1]

    w = worker(store, storage, db_url, make_process)
    assert w.run() == 0
    assert w.outcomes == {JobStatus.SUCCEEDED: 3} and w.stop_reason == "queue empty"
    assert {store.get(i)["status"] for i in ids} == {JobStatus.SUCCEEDED}
    assert len(processes) == 1 and processes[0].starts == 1  # models loaded once for every job


def test_worker_batches_compatible_jobs_into_one_pipeline_call(store, storage, db_url):
    ids = [submit(store, caption=f"song {i}", audio_duration=30) for i in range(3)]
    process = InProcessPipeline("tests.fakes.pipelines:batching")
    w = worker(store, storage, db_url, lambda: process, batch_jobs=3)
    assert w.run() == 0
    assert [len(m.requests) for m in process.received] == [3]
    assert all(store.get(i)["result"]["generation_info"].endswith(", one batch of 3 jobs") for i in ids)


def test_a_job_that_fails_in_a_batch_fails_alone(store, storage, db_url):
    ids = [submit(store, caption=c, audio_duration=30) for c in ("song 1", "song 2 with bad input", "song 3")]
    process = InProcessPipeline("tests.fakes.pipelines:batching")
    w = worker(store, storage, db_url, lambda: process, batch_jobs=3)
    assert w.run() == 0
    assert [len(m.requests) for m in process.received] == [3]
    jobs = [store.get(i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert "bad input in 'song 2 with bad input'" in jobs[1]["error"]
    assert all(j["result"]["generation_info"].endswith(", one batch of 3 jobs") for j in (jobs[0], jobs[2]))


def test_worker_whose_pipeline_cannot_load_takes_no_job(store, storage, db_url):
    job_id = submit(store, caption="x")
    w = worker(store, storage, db_url, lambda: InProcessPipeline("tests.fakes.pipelines:broken_setup"))
    registered = []
    real_touch = store.touch_worker
    store.touch_worker = lambda worker_id, **kw: registered.append(kw.get("state")) or real_touch(worker_id, **kw)
    assert w.run() == 1
    assert WorkerState.SETUP_FAILED in registered
    assert store.get(job_id)["status"] == JobStatus.QUEUED


def test_nul_characters_the_lm_writes_are_taken_out_of_the_stored_result(store, storage):
    job_id = submit(store, caption="fake:nul")
    assert run_claimed(store, storage, InProcessPipeline()) == {str(job_id): JobStatus.SUCCEEDED}
    result = store.get(job_id)["result"]
    assert result["genres"] == "pop" and result["metas"] == {"caption": "ab", "bpm": 90}


def test_a_result_the_database_refuses_fails_the_attempt_at_once(store, storage, monkeypatch):
    from db import StoreError

    job_id = submit(store, caption="x")

    def refuse(*args, **kwargs):
        raise StoreError("database error: unsupported Unicode escape sequence")

    monkeypatch.setattr(store, "complete", refuse)
    assert run_claimed(store, storage, InProcessPipeline()) == {str(job_id): JobStatus.QUEUED}  # retried, not left to the lease
    row = store.get(job_id)
    assert "could not store the result" in row["errors"][-1]["error"] and row["lease_expires_at"] is None
    assert list(storage.root.rglob("output-*")) == []  # the attempt's files went with it


def test_a_commit_that_landed_before_the_connection_dropped_is_kept(store, storage, monkeypatch):
    from db import JobLost

    job_id = submit(store, caption="x")
    real_complete = store.complete

    def landed_then_dropped(*args, **kwargs):
        real_complete(*args, **kwargs)
        raise JobLost("the retried commit finds the job no longer running")

    monkeypatch.setattr(store, "complete", landed_then_dropped)
    assert run_claimed(store, storage, InProcessPipeline()) == {str(job_id): JobStatus.SUCCEEDED}
    row = store.get(job_id)
    assert row["status"] == JobStatus.SUCCEEDED
    for key in row["result"]["audio_keys"]:  # the files the result names are still there
        with storage.open(key) as data:
            assert data.read()


def test_an_lm_task_job_runs_alone_and_stores_its_answer(store, storage):
    settings = Settings(_env_file=None)
    task = {"task": "format", "params": {"caption": "pop rock", "lyrics": "la la", "bpm": 100}}
    ids = [store.submit(new_job(GenerationRequest(), AudioInputs(), settings, lm_task=task)).id for _ in range(2)]
    generation = submit(store, caption="a song", batch_size=1)
    process = InProcessPipeline()
    outcomes = run_claimed(store, storage, process, limit=3)
    assert outcomes == {str(i): JobStatus.SUCCEEDED for i in [*ids, generation]}
    for job_id in ids:
        result = store.get(job_id)["result"]
        assert result["audio_keys"] == [] and result["lm_result"]["caption"] == "formatted: pop rock"
        assert result["lm_result"]["bpm"] == 100
    kinds = [type(m).__name__ for m in process.received]
    assert kinds.count("RunLmTask") == 2 and kinds.count("RunJobs") == 1  # never batched with a generation


def test_an_lm_task_on_a_pipeline_without_lm_tasks_fails_clearly(store, storage):
    job = store.submit(new_job(GenerationRequest(), AudioInputs(), Settings(_env_file=None),
                               lm_task={"task": "format", "params": {}})).id
    process = InProcessPipeline("tests.integration.test_worker_in_process:generation_only")
    assert run_claimed(store, storage, process) == {str(job): JobStatus.FAILED}
    assert "cannot run the LM task" in store.get(job)["error"]


class _GenerationOnly:
    """A pipeline that predates the LM tasks: only `run`."""

    def run(self, request, progress):
        raise AssertionError("an LM task must not be run as a generation")


def generation_only(checkpoint_dir=None, options=None):
    return _GenerationOnly()
