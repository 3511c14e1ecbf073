"""`acestep-serverless dev` with no database configured: embedded Postgres, migrated, the HTTP API
and one worker; the seed's JSON example completes and its audio downloads; Ctrl-C stops it all."""

import io
import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg
import soundfile

from tests.integration.http_harness import free_port


def test_dev_runs_the_whole_system_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACESTEP_DATABASE_URL"}
    port = free_port()
    env |= {"ACESTEP_DATA_DIR": str(tmp_path / "data"), "ACESTEP_PORT": str(port),
            "ACESTEP_PIPELINE": "tests.fakes.pipelines:ok"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("job store ready: "):
                url = line.split(": ", 1)[1].strip()
        assert url and str(tmp_path) in url  # the embedded server, not the machine's
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()["data"]
                if health["live_workers"] == 1:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health and health["database"] == "ok" and health["live_workers"] == 1
        submitted = httpx.post(f"{base}/v1/music/generate", headers={"Content-Type": "application/json"},
                               content='{\n    "caption": "upbeat pop song",\n    "lyrics": "Hello world",\n    "inference_steps": 16\n  }')
        assert submitted.status_code == 200
        job_id = submitted.json()["job_id"]
        while (job := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        audio = httpx.get(job["result"]["first_audio_path"])
        assert audio.status_code == 200 and soundfile.info(io.BytesIO(audio.content)).channels == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
