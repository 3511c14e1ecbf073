"""Prometheus metrics (issue 19): the HTTP function's /metrics follows jobs through the queue and the
fleet, counts webhook deliveries and the ETA's error, and still answers while the database is away;
the worker's metrics port counts claims, attempts, failures, job and stage durations as its real loop
runs jobs."""

import json
import logging
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from db import JobStatus, WorkerState
from handler.http.app import create_app
from handler.http.services import build_services
from handler.logs import JsonFormatter
from handler.settings import Settings
from handler.storage import LocalStorage
from handler.worker.worker import Worker, WorkerOptions
from tests.fakes.in_process import InProcessPipeline
from tests.integration.http_harness import free_port, run_fake_jobs, start_api
from tests.integration.test_webhooks import LOOPBACK, Receiver
from tests.integration.test_worker_in_process import submit
from tests.tcp_proxy import TcpProxy

MODEL = "acestep-v15-turbo"  # the default DiT: what jobs submitted without `model` run on


class Scrape:
    """One scrape, parsed: sample values by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in self.families.values() for s in family.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}


def scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")  # the Prometheus text format
    return Scrape(response.text)


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return Settings(database_url=db_url, data_dir=tmp_path / "data", port=free_port(), max_queued_per_key=1000)


@pytest.fixture
def api(settings, db_url):
    live = start_api(settings, db_url)
    yield live
    live.stop()


def test_queue_depth_and_fleet_follow_a_job_from_queued_to_running_to_succeeded(api):
    metrics = f"{api.url}/metrics"
    idle = scrape(metrics)
    assert idle.value("acestep_database_up") == 1
    assert idle.value("acestep_queue_depth", status="queued", model=MODEL) == 0  # a served model shows while idle
    assert idle.value("acestep_live_workers") == 0 and idle.value("acestep_free_slots") == 0

    job_id = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "a calm piano piece"}).json()["job_id"]
    queued = scrape(metrics)
    assert queued.value("acestep_queue_depth", status="queued", model=MODEL) == 1
    assert queued.value("acestep_queue_depth", status="running", model=MODEL) == 0

    store = api.services.store
    store.register_worker("w-metrics", host="h", capacity=2, models=[], state=WorkerState.READY)
    (job,) = store.claim("w-metrics", 1)
    running = scrape(metrics)
    assert running.value("acestep_queue_depth", status="queued", model=MODEL) == 0
    assert running.value("acestep_queue_depth", status="running", model=MODEL) == 1
    assert running.value("acestep_live_workers") == 1 and running.value("acestep_worker_slots") == 2
    assert running.value("acestep_free_slots") == 1  # one of the two slots holds the job
    assert running.value("acestep_workers", state="READY") == 1

    store.release(job, "w-metrics", refund=True)  # back in line, then finished as a worker would
    assert run_fake_jobs(store, api.services.storage, worker_id="w-metrics") == 1
    done = scrape(metrics)
    assert done.value("acestep_queue_depth", status="queued", model=MODEL) == 0
    assert done.value("acestep_queue_depth", status="running", model=MODEL) == 0
    assert done.value("acestep_free_slots") == 2
    assert job_id not in done.text and "w-metrics" not in done.text  # no job ids, no worker ids


def test_the_eta_error_is_the_finish_against_the_one_the_first_eta_promised_on_every_replica(api, settings, db_url):
    metrics = f"{api.url}/metrics"
    store = api.services.store
    before = scrape(metrics)
    assert before.value("acestep_eta_scored_jobs", model=MODEL) is None  # nothing finished yet
    job_id = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "x"}).json()["job_id"]
    row = store.get(job_id)
    promised = (row["eta_predicted_at"] - row["created_at"]).total_seconds()
    assert promised > 1  # the submit answer's ETA, priced by the cost model (never 0 with work ahead)
    httpx.get(f"{api.url}/v1/jobs/{job_id}")  # later estimates leave the first one as it was
    assert store.get(job_id)["eta_predicted_at"] == row["eta_predicted_at"]

    run_fake_jobs(store, api.services.storage)  # finishes at once: well before the promised time
    finished = store.get(job_id)
    wait = (finished["finished_at"] - finished["created_at"]).total_seconds()
    error = abs((finished["finished_at"] - finished["eta_predicted_at"]).total_seconds())
    other = start_api(settings.model_copy(update={"port": free_port()}), db_url)  # a second API replica
    try:
        for url in (metrics, f"{other.url}/metrics"):
            seen = scrape(url)
            assert seen.value("acestep_eta_scored_jobs", model=MODEL) == 1
            assert seen.value("acestep_eta_error_seconds", model=MODEL, quantile="0.5") == pytest.approx(error, abs=1e-3)
            assert seen.value("acestep_eta_error_ratio", model=MODEL, quantile="0.9") == pytest.approx(error / wait, rel=1e-3)
    finally:
        other.stop()


def test_webhook_deliveries_are_counted_by_outcome(tmp_path, db_url):
    flaky = Receiver(statuses=[500])  # the first POST fails, the retry is delivered
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), webhook_retry_base_seconds=0.2,
                        webhook_allow_networks=LOOPBACK)
    api = start_api(settings, db_url)
    try:
        job_id = httpx.post(f"{api.url}/v1/music/generate", json={"webhook_url": flaky.url}).json()["job_id"]
        httpx.post(f"{api.url}/v1/jobs/{job_id}/cancel")
        flaky.wait_for(2)
        deadline = time.monotonic() + 20
        while (seen := scrape(f"{api.url}/metrics")).value("acestep_webhook_deliveries_total", outcome="delivered") != 1:
            assert time.monotonic() < deadline, seen.text
            time.sleep(0.05)
    finally:
        api.stop()
        flaky.close()
    assert seen.value("acestep_webhook_deliveries_total", outcome="failed") == 1
    assert seen.value("acestep_webhook_deliveries_total", outcome="gave_up") == 0
    assert flaky.url not in seen.text


def test_metrics_answer_without_the_database_and_say_so(tmp_path, db_url):
    server = make_url(db_url)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)
    proxied = server.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    api = start_api(Settings(database_url=proxied, data_dir=tmp_path, port=free_port()), proxied)
    metrics = f"{api.url}/metrics"
    try:
        assert scrape(metrics).value("acestep_database_up") == 1
        proxy.cut()
        down = scrape(metrics)  # still 200
        assert down.value("acestep_database_up") == 0
        assert "acestep_queue_depth" not in down.families and "acestep_live_workers" not in down.families
        assert down.value("acestep_webhook_deliveries_total", outcome="delivered") == 0  # this process's own
        assert "process_cpu_seconds" in down.families or "python_info" in down.families
        proxy.restore()
        deadline = time.monotonic() + 20
        while scrape(metrics).value("acestep_database_up") != 1:  # the pool reconnects
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        api.stop()
        proxy.close()


def test_metrics_can_be_turned_off(tmp_path, db_url):
    settings = Settings(database_url=db_url, data_dir=tmp_path, metrics_enabled=False)
    client = TestClient(create_app(build_services(settings, db_url)))
    assert client.get("/metrics").status_code == 404
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_apps_in_one_process_each_have_their_own_registry(tmp_path, db_url):
    settings = Settings(database_url=db_url, data_dir=tmp_path)
    first, second = (TestClient(create_app(build_services(settings, db_url))) for _ in range(2))
    assert first.get("/metrics").status_code == second.get("/metrics").status_code == 200


# --- the worker --------------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "objects", secret=b"k" * 32)


@pytest.fixture
def json_lines():
    """Every record of the handler.* loggers at INFO and above, formatted as the JSON log does."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("handler")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_worker_loop_counts_claims_attempts_failures_and_durations_on_its_port(store, storage, db_url, json_lines):
    ok = submit(store, caption="a calm piano piece")
    broken = submit(store, caption="fake:raise")  # a pipeline bug: fails for good on its first attempt
    options = WorkerOptions(pipeline="unused", once=True, heartbeat_seconds=0.1, poll_seconds=0.1)
    worker = Worker(store, storage, db_url, options, make_process=InProcessPipeline)
    port = free_port()
    server, _ = worker.metrics.serve(port, "127.0.0.1")
    try:
        assert worker.run() == 0
        seen = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert {store.get(ok)["status"], store.get(broken)["status"]} == {JobStatus.SUCCEEDED, JobStatus.FAILED}
    assert seen.value("acestep_job_attempts_total", model=MODEL, kind="first") == 2
    assert seen.value("acestep_claim_latency_seconds_count", model=MODEL) == 2
    assert seen.value("acestep_job_duration_seconds_count", model=MODEL, outcome="succeeded") == 1
    assert seen.value("acestep_job_duration_seconds_count", model=MODEL, outcome="failed") == 1
    assert seen.value("acestep_job_failures_total", model=MODEL, reason="pipeline_error", final="true") == 1
    (sample,) = store.cost_samples()  # the succeeded job's stored timings
    stored = set(sample["timings"]["stages"])
    assert {"lm", "dit", "vae"} <= stored == seen.labelled("acestep_stage_duration_seconds_count", "stage")
    assert seen.value("acestep_stage_duration_seconds_count", model=MODEL, stage="dit") == 1

    # every log line about the jobs, as JSON: its event, the job, the attempt and this worker
    records = [json.loads(line) for line in json_lines]
    about_jobs = [r for r in records if r.get("job_id") in (str(ok), str(broken))]
    assert {r["event"] for r in about_jobs} >= {"job_claimed", "job_done", "attempt_failed"}
    for record in about_jobs:
        assert record["attempt"] == 1 and record["worker_id"] == worker.worker_id, record
        assert {"ts", "level", "logger", "message"} <= set(record)
    (failed,) = [r for r in about_jobs if r["event"] == "attempt_failed"]
    assert failed["job_id"] == str(broken) and failed["reason"] == "pipeline_error" and failed["status"] == "failed"


def test_a_retried_attempt_counts_as_a_retry_and_its_wait_is_not_a_claim_latency(store, storage, db_url):
    job_id = submit(store, caption="x")
    (job,) = store.claim("another-worker", 1)
    assert store.fail(job, "another-worker", "a transient error", retryable=True) == JobStatus.QUEUED
    with store.engine.begin() as conn:  # due now, not after the retry's backoff
        conn.execute(text("UPDATE jobs SET run_after = now() WHERE id = :id"), {"id": job_id})
    worker = Worker(store, storage, db_url, WorkerOptions(pipeline="unused", once=True, poll_seconds=0.1),
                    make_process=InProcessPipeline)
    assert worker.run() == 0 and store.get(job_id)["attempt"] == 2
    samples = Scrape(worker_exposition(worker))
    assert samples.value("acestep_job_attempts_total", model=MODEL, kind="retry") == 1
    assert samples.value("acestep_job_attempts_total", model=MODEL, kind="first") is None
    assert samples.value("acestep_claim_latency_seconds_count", model=MODEL) is None


def worker_exposition(worker: Worker) -> str:
    return generate_latest(worker.metrics.registry).decode()


def test_worker_metrics_in_one_process_do_not_collide(store, storage, db_url):
    options = WorkerOptions(pipeline="unused", once=True)
    first, second = (Worker(store, storage, db_url, options, make_process=InProcessPipeline) for _ in range(2))
    assert first.metrics.registry is not second.metrics.registry
