"""Issue 14 on the worker side, over the real store: progress reaches the row as the pipeline reports
it (not at the lease heartbeat, set to an hour here), a cancel reaches a running pipeline through
NOTIFY even while it reports nothing, the poll after a cancel shows it pending, and a finished job
stores what its stages cost and the duration the run learned.

The pipeline is scripted (`Scripted`): each test's script reports progress and waits, in the
pipeline's own thread, for what the test must see before it goes on."""

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from db import JobStatus, StoreError
from handler.http.job_view import job_response
from handler.settings import Settings
from handler.storage import LocalStorage
from handler.worker.job_run import JobRun
from pipeline.contract import STAGES, stage_progress
from pipeline.interface import GeneratedAudio
from tests.fakes.in_process import InProcessPipeline
from tests.fakes.pipelines import _tone
from tests.integration.http_harness import free_port, start_api
from handler.worker.worker import Worker, WorkerOptions
from tests.integration.test_worker_in_process import submit

AN_HOUR = 3600.0  # the lease heartbeat: nothing in these tests may wait for it
PATIENCE = 30.0  # how long a test waits for what it expects before it fails (never reached when it works)


class Scripted:
    """A pipeline that runs `script(progress)` for each request, then returns a short tone."""

    def __init__(self):
        self.script: Callable = lambda progress: None

    def run(self, request, progress):
        self.script(progress)
        return GeneratedAudio([_tone()], info={"seed_value": "1"})


def scripted(checkpoint_dir=None, options=None):
    return Scripted()


class Watched(InProcessPipeline):
    """The in-process pipeline, saying when the worker asked it to cancel."""

    def __init__(self):
        super().__init__("tests.integration.test_worker_progress_cancel:scripted")
        self.canceled = threading.Event()
        self.ensure_started()

    def cancel(self) -> None:
        super().cancel()
        self.canceled.set()


def eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PATIENCE
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "objects", secret=b"k" * 32)


def run_in_background(store, storage, process, jobs=1) -> tuple[JobRun, threading.Thread, dict]:
    run = JobRun(store.claim("w-test", jobs), store=store, storage=storage, process=process, worker_id="w-test",
                 heartbeat_seconds=AN_HOUR, timeout_seconds=120)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run.run()))
    thread.start()
    return run, thread, outcome


def row_shows(store, job_id, stage: str, within: float) -> Callable[[], bool]:
    def check() -> bool:
        row = store.get(job_id)
        return row["stage"] == stage and row["progress"] == pytest.approx(stage_progress(stage, within))
    return check


def test_every_new_progress_reaches_the_row_long_before_the_heartbeat(store, storage):
    job_id = submit(store, caption="x", audio_duration=30)
    process = Watched()
    seen = []

    def script(progress):
        for stage, within in (("preparing", 0.0), ("dit", 0.25), ("dit", 0.5), ("vae", 0.5)):
            progress(stage, stage_progress(stage, within))
            seen.append(eventually(row_shows(store, job_id, stage, within)))

    process.pipeline.script = script
    _, thread, outcome = run_in_background(store, storage, process)
    thread.join(PATIENCE * 5)
    assert outcome == {str(job_id): JobStatus.SUCCEEDED}
    assert seen == [True] * 4


def test_a_cancel_reaches_a_pipeline_that_reports_nothing_through_notify(store, storage, db_url):
    job_id = submit(store, caption="x")
    process = Watched()
    release = threading.Event()
    polled = {}

    def script(progress):
        progress("dit", stage_progress("dit", 0.5))
        assert eventually(row_shows(store, job_id, "dit", 0.5))  # written once; nothing new to write after it
        store.cancel(job_id)
        assert process.canceled.wait(PATIENCE)  # neither a progress write nor a heartbeat could have said it
        polled.update(job_response(store.get(job_id), position=0, eta=None, url_for=str))
        release.wait(PATIENCE)
        progress("dit", stage_progress("dit", 0.6))  # the next step: stops here

    process.pipeline.script = script
    running = Worker(store, storage, db_url, WorkerOptions(pipeline="unused", once=True, heartbeat_seconds=AN_HOUR,
                                                        poll_seconds=0.1), make_process=lambda: process)
    thread = threading.Thread(target=running.run)
    thread.start()
    assert eventually(lambda: bool(polled))
    assert polled["status"] == JobStatus.RUNNING and polled["cancel_requested"] is True
    release.set()
    thread.join(PATIENCE * 2)
    assert store.get(job_id)["status"] == JobStatus.CANCELED and running.outcomes == {JobStatus.CANCELED: 1}


def test_one_canceled_job_of_a_batch_leaves_the_others_running(store, storage):
    first = submit(store, caption="x", audio_duration=30)
    second = submit(store, caption="x", audio_duration=30)
    process = Watched()

    def script(progress):
        if store.get(first)["cancel_requested"]:
            return  # the second request of the batch
        progress("dit", stage_progress("dit", 0.5))
        assert eventually(row_shows(store, first, "dit", 0.5))
        store.cancel(first)
        progress("dit", stage_progress("dit", 0.75))  # its write returns the cancel request
        assert eventually(row_shows(store, second, "dit", 0.75))

    process.pipeline.script = script
    _, thread, outcome = run_in_background(store, storage, process, jobs=2)
    thread.join(PATIENCE * 5)
    assert outcome == {str(first): JobStatus.CANCELED, str(second): JobStatus.SUCCEEDED}
    assert not process.canceled.is_set()  # the pipeline ran on for the job still wanted


def test_a_finished_job_stores_its_stage_timings_and_the_learned_duration(store, storage, monkeypatch):
    job_id = submit(store, caption="x", thinking=True)  # no audio_duration: the LM picks it
    process = Watched()
    repriced = []
    completions = []
    complete = store.complete
    monkeypatch.setattr(store, "complete", lambda *args, **kw: completions.append(kw["timings"]) or complete(*args, **kw))

    def script(progress):
        progress("preparing", stage_progress("preparing", 0.0))
        progress("lm", stage_progress("lm", 0.5))
        progress("conditioning", stage_progress("conditioning", 0.0), audio_seconds=42.0)
        repriced.append(eventually(lambda: store.get(job_id)["audio_seconds"] == 42.0))  # while it runs
        for stage in ("dit", "vae"):
            progress(stage, stage_progress(stage, 1.0))

    process.pipeline.script = script
    _, thread, outcome = run_in_background(store, storage, process)
    thread.join(PATIENCE * 5)
    assert outcome == {str(job_id): JobStatus.SUCCEEDED} and repriced == [True]
    (timings,) = completions
    assert list(timings["stages"]) == list(STAGES)  # claimed, then each stage the run went through, in order
    assert all(seconds >= 0 for seconds in timings["stages"].values())
    assert timings["audio_seconds"] == 42.0 and timings["batch_jobs"] == 1
    assert store.cost_samples()[0]["timings"] == timings


def test_a_batch_splits_its_stage_time_over_its_jobs(store, storage, monkeypatch):
    ids = {submit(store, caption="x", audio_duration=30) for _ in range(2)}
    completions = {}
    complete = store.complete
    monkeypatch.setattr(store, "complete",
                        lambda job, *args, **kw: completions.update({job.id: kw["timings"]}) or complete(job, *args, **kw))
    process = Watched()
    process.pipeline.script = lambda progress: progress("dit", stage_progress("dit", 1.0))
    _, thread, outcome = run_in_background(store, storage, process, jobs=2)
    thread.join(PATIENCE * 5)
    assert outcome == {str(i): JobStatus.SUCCEEDED for i in ids} and set(completions) == ids
    for timings in completions.values():
        assert timings["batch_jobs"] == 2 and timings["audio_seconds"] == 30.0  # the request's: no fact came
        assert {"claimed", "dit", "encoding", "uploading"} <= set(timings["stages"])


def test_the_first_run_of_each_kind_of_work_on_a_process_is_marked_cold(store, storage, monkeypatch):
    """It may have paid for warming up: the first 30 s song, not the second; the first 60 s song; a
    30 s song again once the process was started afresh."""
    completions = []
    complete = store.complete
    monkeypatch.setattr(store, "complete", lambda *args, **kw: completions.append(kw["timings"]) or complete(*args, **kw))
    process = Watched()
    process.pipeline.script = lambda progress: progress("dit", stage_progress("dit", 1.0))
    for seconds in (30, 30, 60, 30):
        if len(completions) == 3:
            process.pipeline = None  # as a restarted child: nothing is warm
            process.ensure_started()
            process.pipeline.script = lambda progress: progress("dit", stage_progress("dit", 1.0))
        job_id = submit(store, caption="x", audio_duration=seconds)
        _, thread, outcome = run_in_background(store, storage, process)
        thread.join(PATIENCE * 5)
        assert outcome == {str(job_id): JobStatus.SUCCEEDED}
    assert [t["cold"] for t in completions] == [True, False, True, True]


def test_a_failed_reprice_never_fails_the_job(store, storage, monkeypatch):
    job_id = submit(store, caption="x")
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise StoreError("database error")

    monkeypatch.setattr(store, "reprice", refuse)
    process = Watched()

    def script(progress):
        progress("conditioning", stage_progress("conditioning", 0.0), audio_seconds=12.0)
        assert eventually(lambda: bool(tried))

    process.pipeline.script = script
    _, thread, outcome = run_in_background(store, storage, process)
    thread.join(PATIENCE * 5)
    assert outcome == {str(job_id): JobStatus.SUCCEEDED}


# ---- the poll a client makes ------------------------------------------------------------------


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path / "data", port=free_port()), db_url)
    yield live
    live.stop()


def test_the_poll_after_a_cancel_shows_it_pending_until_the_worker_stops(api, store):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        queued = client.post("/v1/music/generate", json={"caption": "x"}).json()["job_id"]
        assert client.get(f"/v1/jobs/{queued}").json()["cancel_requested"] is False
        (job,) = store.claim("w-test", 1)
        answer = client.post(f"/v1/jobs/{job.id}/cancel").json()
        assert answer["status"] == "running" and answer["cancel_requested"] is True
        assert client.get(f"/v1/jobs/{job.id}").json()["cancel_requested"] is True
        store.finish_canceled(job, "w-test")
        done = client.get(f"/v1/jobs/{job.id}").json()
        assert done["status"] == "canceled" and done["cancel_requested"] is None
