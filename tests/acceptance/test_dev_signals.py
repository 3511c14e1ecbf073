"""`acestep-serverless dev` stopped by SIGTERM (`kill <pid>`) or SIGINT (Ctrl-C): nothing it started
is left running, neither its worker nor its embedded Postgres (issue 14)."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.integration.http_harness import free_port

STOP_BOUND_SECONDS = 60


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(pids: list[int], deadline: float) -> list[int]:
    while (left := [pid for pid in pids if not gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_dev_stops_its_worker_and_its_postgres(tmp_path, stop):
    env = {k: v for k, v in os.environ.items() if k != "ACESTEP_DATABASE_URL"}
    port = free_port()
    data = tmp_path / "data"
    env |= {"ACESTEP_DATA_DIR": str(data), "ACESTEP_PORT": str(port), "ACESTEP_PIPELINE": "tests.fakes.pipelines:ok"}
    dev = subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        health = {}
        while health.get("generation") != "ready":
            assert time.monotonic() < deadline and dev.poll() is None, health
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["data"]
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        [worker] = [p.pid for p in psutil.Process(dev.pid).children() if "worker" in p.cmdline()]
        postgres = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
        started = [worker, postgres]

        dev.send_signal(stop)
        output = dev.communicate(timeout=STOP_BOUND_SECONDS)[0]
        assert "stopped" in output, output
        assert wait_until_gone(started, time.monotonic() + 30) == [], output
        assert json.loads((data / "postgres" / ".handle_pids.json").read_text()) == []
    finally:
        if dev.poll() is None:
            dev.kill()
        for pid in started:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
