"""The JSON log of the real entry points (issue 19): `serve` and `worker` started as an operator would,
their stderr a pipe (ACESTEP_LOG_FORMAT=auto: JSON), every line one JSON object; uvicorn's access log
through the same formatter with polls quiet and signed links redacted; the worker's lines about a
job carrying its job_id, attempt and worker_id, and its metrics port answering."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.worker_harness import start_worker, submit, wait_status, worker_env
from tests.integration.http_harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def without_log_format(env: dict[str, str]) -> dict[str, str]:
    """The environment with ACESTEP_LOG_FORMAT unset: the default, auto."""
    return {k: v for k, v in env.items() if k != "ACESTEP_LOG_FORMAT"}


def json_lines(output: str) -> list[dict]:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{output}") from None
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
    return records


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_serve_logs_json_lines_with_the_access_log_through_the_same_formatter(db_url, tmp_path):
    port = free_port()
    env = without_log_format({**os.environ, "ACESTEP_DATABASE_URL": db_url, "ACESTEP_PORT": str(port),
                              "ACESTEP_DATA_DIR": str(tmp_path)})
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "serve"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or _answers(f"{url}/health"))
        assert proc.poll() is None, log_path.read_text()
        job_id = httpx.post(f"{url}/v1/music/generate", json={"caption": "x"}).json()["job_id"]
        assert httpx.get(f"{url}/v1/jobs/{job_id}").status_code == 200  # a poll: quiet
        assert httpx.get(f"{url}/metrics").status_code == 200  # a scrape: quiet
        assert httpx.get(f"{url}/v1/audio", params={"path": "forged.signature"}).status_code >= 400
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    records = json_lines(log_path.read_text())
    assert any("Uvicorn running on" in r["message"] and r["logger"] == "uvicorn.error" for r in records)
    access = [r for r in records if r.get("event") == "http_request"]
    assert all(r["logger"] == "uvicorn.access" for r in access)
    submitted = [r for r in access if r["method"] == "POST" and r["path"] == "/v1/music/generate"]
    assert len(submitted) == 1 and submitted[0]["status"] == 200 and submitted[0]["level"] == "INFO"
    assert not [r for r in access if r["path"].startswith(("/v1/jobs/", "/metrics", "/health"))]
    (audio,) = [r for r in access if r["path"].startswith("/v1/audio")]
    assert audio["path"] == "/v1/audio?…" and "forged" not in log_path.read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_worker_logs_each_job_as_json_lines_and_serves_its_metrics_port(store, db_url, tmp_path):
    job_id = submit(store, caption="a calm piano piece", audio_format="wav")
    port = free_port()
    env = without_log_format(worker_env(db_url, tmp_path, ACESTEP_WORKER_METRICS_PORT=str(port),
                                        ACESTEP_WORKER_METRICS_HOST="127.0.0.1"))
    worker = start_worker(env)  # no --once: it keeps serving its port until stopped
    try:
        wait_status(store, job_id, "succeeded")
        scraped = wait_until(lambda: _worker_samples(port).get(("acestep_job_duration_seconds_count", "succeeded")))
        assert scraped == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    records = json_lines(output)
    about_job = [r for r in records if r.get("job_id") == job_id]
    assert {"job_claimed", "job_done"} <= {r["event"] for r in about_job}
    (ready,) = [r for r in records if r.get("event") == "worker_ready"]
    for record in about_job:
        assert record["attempt"] == 1 and record["worker_id"] == ready["worker_id"], record
    (done,) = [r for r in about_job if r["event"] == "job_done"]
    assert done["outcome"] == "succeeded" and done["level"] == "INFO" and done["logger"] == "handler.worker.worker"


def _worker_samples(port: int) -> dict[tuple[str, str], float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    return {(s.name, s.labels.get("outcome", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
