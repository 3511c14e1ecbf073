"""`acestep-serverless dev` with no database configured starts an embedded Postgres and migrates it."""

import os
import signal
import subprocess
import sys
import time

import psycopg


def test_dev_starts_an_embedded_migrated_database_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACESTEP_DATABASE_URL"}
    env["ACESTEP_DATA_DIR"] = str(tmp_path / "data")
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
