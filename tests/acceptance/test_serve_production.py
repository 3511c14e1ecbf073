"""`serve` in production: refuses to start without API keys unless told to run open."""

import os
import subprocess
import sys

from handler.http.auth import create_api_key
from tests.integration.http_harness import free_port

STRONG_SECRET = "7f3a9c0e51b24d68a1e9f0c3b7d2e45a"  # 32 characters, not a repeated few


def serve(db_url: str, tmp_path, **extra: str) -> subprocess.Popen:
    env = {**os.environ, "ACESTEP_DATABASE_URL": db_url, "ACESTEP_ENV": "production", "ACESTEP_PORT": str(free_port()),
           "ACESTEP_DATA_DIR": str(tmp_path), "ACESTEP_SECRET_KEY": STRONG_SECRET, **extra}
    return subprocess.Popen([sys.executable, "-m", "handler.cli", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_production_without_keys_refuses_to_start(db_url, tmp_path):
    proc = serve(db_url, tmp_path)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "create-key" in output and "ACESTEP_ALLOW_OPEN" in output


def test_production_starts_with_a_key_or_when_told_to_run_open(db_url, tmp_path, store):
    for extra in ({"ACESTEP_ALLOW_OPEN": "true"}, {}):
        if not extra:
            create_api_key(store, "ops")
        proc = serve(db_url, tmp_path, **extra)
        try:
            line = ""
            while "Uvicorn running" not in line and "Application startup complete" not in line:
                line = proc.stdout.readline()
                assert line, "serve exited"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
