"""Webhooks: signed POSTs from the outbox, retried, and not lost when the app restarts."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import text

from handler.backends import secret_key
from handler.settings import Settings
from handler.webhooks import owner_webhook_secret
from tests.integration.http_harness import free_port, run_fake_jobs, start_api

LOOPBACK = "127.0.0.0/8,::1/128"


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records POSTs and answers with the queued status codes."""

    def __init__(self, statuses: list[int] | None = None):
        self.received: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} webhooks arrived"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    # The receivers listen on loopback, which webhooks may reach only when the deployment allows it.
    return Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), webhook_retry_base_seconds=0.2,
                    webhook_allow_networks=LOOPBACK)


def verify(settings: Settings, headers: dict, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in headers["X-AceStep-Signature"].split(","))
    secret = owner_webhook_secret(secret_key(settings), "")
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def outbox(engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT event, attempts, delivered_at IS NOT NULL FROM webhook_outbox ORDER BY id")).all()


def test_finished_job_is_posted_signed_with_its_result(settings, db_url, receiver, engine):
    api = start_api(settings, db_url)
    try:
        job_id = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "x", "webhook_url": receiver.url}).json()["job_id"]
        run_fake_jobs(api.services.store, api.services.storage)
        receiver.wait_for(1)
        headers, body = receiver.received[0]
        audio_url = json.loads(body)["job"]["result"]["first_audio_path"]
        assert httpx.get(audio_url).status_code == 200
    finally:
        api.stop()
    assert verify(settings, headers, body)
    assert not verify(settings, headers, body + b" ")
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" == headers["X-AceStep-Event"]
    assert payload["job"]["job_id"] == job_id and payload["job"]["status"] == "succeeded"
    assert outbox(engine) == [("job.succeeded", 1, True)]


def test_delivery_survives_an_app_restart(settings, db_url, receiver, engine):
    api = start_api(settings, db_url)
    job_id = httpx.post(f"{api.url}/v1/music/generate", json={"webhook_url": receiver.url}).json()["job_id"]
    store, storage = api.services.store, api.services.storage
    api.stop()
    run_fake_jobs(store, storage)  # the job finishes while no app is running
    time.sleep(0.3)
    assert receiver.received == [] and outbox(engine) == [("job.succeeded", 0, False)]
    restarted = start_api(settings, db_url)
    try:
        receiver.wait_for(1)
    finally:
        restarted.stop()
    assert json.loads(receiver.received[0][1])["job"]["job_id"] == job_id
    assert outbox(engine) == [("job.succeeded", 1, True)]


def test_failed_posts_are_retried_with_backoff(settings, db_url, engine):
    flaky = Receiver(statuses=[500, 503])
    api = start_api(settings, db_url)
    try:
        job_id = httpx.post(f"{api.url}/v1/music/generate", json={"webhook_url": flaky.url}).json()["job_id"]
        httpx.post(f"{api.url}/v1/jobs/{job_id}/cancel")
        flaky.wait_for(3)
        time.sleep(0.2)
    finally:
        api.stop()
        flaky.close()
    assert [json.loads(body)["event"] for _, body in flaky.received] == ["job.canceled"] * 3
    assert outbox(engine) == [("job.canceled", 3, True)]
