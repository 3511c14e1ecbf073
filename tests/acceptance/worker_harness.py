"""Real worker processes over a test database and local object storage, and helpers to watch jobs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from db import JobStore
from pipeline.contract import GenerationRequest
from handler.http.inputs import AudioInputs
from handler.http.routes_jobs import new_job
from handler.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def submit(store: JobStore, **fields) -> str:
    """Queue a job as the HTTP function would (validated request, its batch key, no audio inputs)."""
    job = new_job(GenerationRequest(**fields), AudioInputs(), Settings(_env_file=None))
    return str(store.submit(job).id)


def worker_env(db_url: str, tmp_path: Path, pipeline: str = "ok", **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ACESTEP_DATABASE_URL": db_url,
        "ACESTEP_DATA_DIR": str(tmp_path / "data"),
        "ACESTEP_STORAGE_URL": (tmp_path / "objects").as_uri(),
        "ACESTEP_SECRET_KEY": "k" * 32,
        "ACESTEP_PIPELINE": f"tests.fakes.pipelines:{pipeline}",
        "ACESTEP_HEARTBEAT_SECONDS": "0.5",
        "ACESTEP_LEASE_SECONDS": "3",
        "ACESTEP_RETRY_BASE_SECONDS": "0",
        "FAKE_STAGE_SECONDS": "0.05",
        **extra,
    }


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`acestep-serverless worker` in its own process group (killing the group is a container kill)."""
    return subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "worker", *args], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def wait_status(store: JobStore, job_id: str, *statuses: str, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (row := store.get(job_id))["status"] in statuses and row, timeout)
