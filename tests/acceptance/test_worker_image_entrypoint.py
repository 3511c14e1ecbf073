"""The worker image's entry point (infra/docker/entrypoint.sh) run for real against a test database: the
`worker` mode runs jobs (on the fake pipeline, which needs no checkpoints), `migrate` migrates, and the
health check follows a running worker's heartbeat. The modes without a database are in
tests/unit/test_worker_image.py."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.worker_harness import ROOT, submit, wait_for, worker_env

ENTRYPOINT = ROOT / "infra" / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def image_env(db_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A worker's environment as in the image: the project's commands on PATH, an empty /weights, the
    fake pipeline importable (in the image it would be the real one), a health file of its own."""
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    return worker_env(db_url, tmp_path) | {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),
        "ACESTEP_CHECKPOINT_DIR": str(weights),
        "ACESTEP_HEALTH_FILE": str(tmp_path / "alive"),
    } | extra


def entry(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(ENTRYPOINT), *args], env=env, cwd=tmp_cwd(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def tmp_cwd(env: dict[str, str]) -> str:
    """Not the checkout: the image's WORKDIR holds no sources either."""
    return str(Path(env["ACESTEP_CHECKPOINT_DIR"]).parent)


def test_worker_mode_runs_the_queue_on_the_fake_pipeline_without_weights(store, db_url, tmp_path):
    ids = [submit(store, caption="a"), submit(store, caption="b", batch_size=1)]
    worker = entry(["worker", "--once"], image_env(db_url, tmp_path))
    output, _ = worker.communicate(timeout=180)
    assert worker.returncode == 0, output
    assert "weights not checked: ACESTEP_PIPELINE is tests.fakes.pipelines:ok" in output
    assert [store.get(i)["status"] for i in ids] == ["succeeded", "succeeded"]


def test_worker_mode_with_the_real_pipeline_and_no_weights_touches_nothing(store, db_url, tmp_path):
    job = submit(store, caption="a")
    worker = entry(["worker", "--once"], image_env(db_url, tmp_path, ACESTEP_PIPELINE="pipeline.service:load_pipeline"))
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 78, output
    assert "no usable checkpoints" in output
    assert store.get(job)["status"] == "queued" and store.workers() == []  # never registered, claimed nothing


def test_migrate_mode_migrates_an_empty_database(empty_db_url, tmp_path):
    migrate = entry(["migrate"], image_env(empty_db_url, tmp_path))
    output, _ = migrate.communicate(timeout=120)
    assert migrate.returncode == 0, output
    assert "database at revision head" in output
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
        assert conn.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()[0]


def _health(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "handler.healthcheck"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_the_health_check_follows_a_running_workers_heartbeat(store, db_url, tmp_path):
    worker_source = (ROOT / "handler" / "worker" / "worker.py").read_text()
    if "healthcheck" not in worker_source:
        pytest.skip("the worker does not call handler.healthcheck.beat() yet (its heartbeat loop should)")
    env = image_env(db_url, tmp_path, ACESTEP_HEARTBEAT_SECONDS="0.5")
    assert _health(env).returncode == 1  # nothing beats yet
    worker = entry(["worker", "--exit-when-idle", "4"], env)
    try:
        wait_for(lambda: (tmp_path / "alive").exists(), timeout=60)
        healthy = _health(env)
        assert healthy.returncode == 0, healthy.stdout
        assert healthy.stdout.startswith("healthy:")
    finally:
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    stale = time.time() - 600
    os.utime(tmp_path / "alive", (stale, stale))  # as if the worker had hung ten minutes ago
    unhealthy = _health(env)
    assert unhealthy.returncode == 1 and "stale" in unhealthy.stdout


def test_the_default_mode_is_the_runpod_handler_with_the_sdks_flags(store, db_url, tmp_path):
    """No mode given, a flag first (as a RunPod template's start command would pass it): the RunPod
    handler runs a native job through the SDK's --test_input, on the fake pipeline."""
    pytest.importorskip("runpod", reason="the runpod SDK (the `runpod` extra) is not installed")
    env = image_env(db_url, tmp_path)
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "RUNPOD_POD_ID", "RUNPOD_AI_API_KEY", "ACESTEP_MODE"):
        env.pop(name, None)  # the SDK's local mode
    job = {"id": "rp-image-1", "input": {"caption": "calm piano", "audio_duration": 10, "batch_size": 1}}
    runpod = entry(["--test_input", json.dumps(job)], env)
    output, _ = runpod.communicate(timeout=180)
    assert runpod.returncode == 0, output
    line = next(line for line in output.splitlines() if "Job result:" in line)
    result = ast.literal_eval(line.split("Job result:", 1)[1].strip())["output"]
    assert result["status"] == "succeeded" and store.get(result["job_id"])["status"] == "succeeded"
