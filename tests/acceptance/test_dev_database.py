"""`acestep-serverless dev` with no database configured: embedded Postgres, migrated, and the HTTP API."""

import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg

from tests.integration.http_harness import free_port


def test_dev_serves_the_api_on_an_embedded_database_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACESTEP_DATABASE_URL"}
    port = free_port()
    env |= {"ACESTEP_DATA_DIR": str(tmp_path / "data"), "ACESTEP_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("job store ready: "):
                url = line.split(": ", 1)[1].strip()
        assert url, "dev never reported its database"
        assert str(tmp_path) in url  # the embedded server, not the machine's
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        health = None
        while health is None and time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
        assert health is not None and health.json()["database"] == "ok"
        submitted = httpx.post(f"http://127.0.0.1:{port}/v1/music/generate", json={"caption": "upbeat pop song"})
        assert submitted.status_code == 200 and submitted.json()["queue_position"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
