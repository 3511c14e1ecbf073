"""Queue maintenance on a real Postgres: lease rescue, retention and webhook rounds through one
`Maintenance`, each task isolated from the others' failures."""

import io
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx

from db import JobStatus, JobStore, NewJob, StoreError
from handler.maintenance import Maintenance
from handler.settings import Settings
from handler.storage import LocalStorage
from tests.integration.http_harness import free_port, start_api

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WEEK = 7 * 86400


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def local_storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects", secret=b"s" * 32)


def finished_job(store: JobStore, storage: LocalStorage, when: datetime):
    """A job that succeeded at `when`, with one output file."""
    job_id = store.submit(NewJob(request={}), now=when).id
    job = store.claim("w", 1, now=when)[0]
    key = f"jobs/{job_id}/attempt-1/output-0.mp3"
    storage.put(key, io.BytesIO(b"audio"), "audio/mpeg")
    store.complete(job, "w", {"audio_keys": [key]}, now=when)
    return job_id


def test_run_once_rescues_expired_leases(store, tmp_path):
    job_id = store.submit(NewJob(request={}), now=at(0)).id
    store.claim("w", 1, now=at(1))  # the lease (30 s) ends at 31 s
    maintenance = Maintenance(store, local_storage(tmp_path), retention_seconds=WEEK)

    assert maintenance.run_once(now=at(20)).rescued == []
    outcome = maintenance.run_once(now=at(32))
    assert outcome.rescued == [(job_id, JobStatus.QUEUED)] and outcome.failed == {}
    row = store.get(job_id)
    assert (row["status"], row["worker_id"], row["attempt"]) == (JobStatus.QUEUED, None, 1)


def test_run_once_prunes_expired_jobs_and_their_files(store, tmp_path):
    storage = local_storage(tmp_path)
    old = finished_job(store, storage, T0)
    recent = finished_job(store, storage, T0 + timedelta(days=6))
    maintenance = Maintenance(store, storage, retention_seconds=WEEK)

    outcome = maintenance.run_once(now=T0 + timedelta(days=8))
    assert (outcome.pruned, outcome.rescued, outcome.webhooks_sent) == (1, [], None)
    assert not (tmp_path / "objects" / "jobs" / str(old)).exists()
    assert (tmp_path / "objects" / "jobs" / str(recent)).exists()
    assert store.get(recent)["status"] == JobStatus.SUCCEEDED


def test_tick_runs_only_the_tasks_that_are_due(store, tmp_path):
    maintenance = Maintenance(store, local_storage(tmp_path), retention_seconds=WEEK, rescue_every=0, prune_every=3600)
    first = maintenance.tick(now=at(0))
    assert (first.rescued, first.pruned) == ([], 0)  # everything is due at the start

    job_id = store.submit(NewJob(request={}), now=at(0)).id
    store.claim("w", 1, now=at(1))
    second = maintenance.tick(now=at(100))
    assert (second.rescued, second.pruned) == ([(job_id, JobStatus.QUEUED)], None)  # prune not due for an hour


class BrokenRescueStore(JobStore):
    def rescue_expired(self, **kwargs):
        raise StoreError("database error: rescue broke")


class ExplodingStorage(LocalStorage):
    def delete_prefix(self, prefix: str) -> None:
        raise RuntimeError("storage bug")


def test_a_failing_task_does_not_stop_the_others(engine, store, tmp_path, caplog):
    storage = local_storage(tmp_path)
    finished_job(store, storage, T0)
    broken = BrokenRescueStore(engine, lease_seconds=30)
    maintenance = Maintenance(broken, storage, retention_seconds=WEEK)

    with caplog.at_level(logging.WARNING, logger="handler.maintenance"):
        outcome = maintenance.run_once(now=T0 + timedelta(days=8))
    assert outcome.pruned == 1 and outcome.rescued is None
    assert isinstance(outcome.failed["rescue"], StoreError)
    assert any(r.getMessage() == "maintenance task rescue failed: database error: rescue broke" for r in caplog.records)

    # The other way round: a bug in pruning (not a storage error) leaves the rescue done.
    job_id = store.submit(NewJob(request={}), now=at(0)).id
    store.claim("w", 1, now=at(1))
    finished_job(store, storage, T0)
    maintenance = Maintenance(store, ExplodingStorage(tmp_path / "objects", secret=b"s" * 32), retention_seconds=WEEK)
    outcome = maintenance.run_once(now=T0 + timedelta(days=8))
    assert outcome.rescued == [(job_id, JobStatus.QUEUED)]
    assert isinstance(outcome.failed["prune"], RuntimeError)

    # A failing webhook round is isolated too.
    class BrokenWebhooks:
        def run_once(self) -> int:
            raise RuntimeError("webhooks broke")

    outcome = Maintenance(store, storage, retention_seconds=WEEK, webhooks=BrokenWebhooks()).run_once()
    assert (outcome.rescued, outcome.pruned) == ([], 0) and set(outcome.failed) == {"webhooks"}


def test_start_runs_the_tasks_in_the_background_and_stop_ends_them(store, tmp_path):
    job_id = store.submit(NewJob(request={}), now=at(0)).id
    store.claim("w", 1, now=at(1))  # long expired by the database's clock

    class RecordingWebhooks:
        def __init__(self):
            self.looping = threading.Event()

        def run_until(self, stop: threading.Event) -> None:
            self.looping.set()
            stop.wait()

    webhooks = RecordingWebhooks()
    maintenance = Maintenance(store, local_storage(tmp_path), retention_seconds=WEEK, webhooks=webhooks)
    threads = maintenance.start()
    try:
        assert [t.name for t in threads] == ["maintenance", "webhooks"]
        deadline = time.monotonic() + 10
        while store.get(job_id)["status"] != JobStatus.QUEUED:
            assert time.monotonic() < deadline, "the background rescue did not happen"
            time.sleep(0.05)
        assert webhooks.looping.wait(5)
    finally:
        maintenance.stop()
    assert not any(t.is_alive() for t in threads)

    # Without webhooks (the worker's use): one thread, rescue and prune only.
    maintenance = Maintenance(store, local_storage(tmp_path), retention_seconds=WEEK)
    assert [t.name for t in maintenance.start()] == ["maintenance"]
    maintenance.stop()


def test_the_http_function_rescues_expired_leases(db_url, store, tmp_path):
    job_id = store.submit(NewJob(request={}), now=at(0)).id
    store.claim("gone-worker", 1, now=at(1))
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port())
    api = start_api(settings, db_url)
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{api.url}/v1/jobs/{job_id}").json()["status"] != JobStatus.QUEUED:
            assert time.monotonic() < deadline, "the API did not rescue the job"
            time.sleep(0.1)
    finally:
        api.stop()
    assert store.get(job_id)["errors"][0]["error"] == "lease expired: the worker stopped responding"
