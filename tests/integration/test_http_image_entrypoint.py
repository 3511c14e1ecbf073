"""The HTTP image's commands run as the image runs them (infra/docker/http.Dockerfile: ENTRYPOINT
`acestep-serverless`, CMD `serve`, HEALTHCHECK `python -m handler.healthcheck --http`), with what the
image leaves out (torch, transformers, diffusers, safetensors, peft, pgserver, huggingface_hub) made
unimportable: `migrate` and `create-key` against a new database, `serve` in production answering
/health, the health check passing while it serves and failing once it stopped. No Docker engine runs
on the test machines; this is the image's process without the container."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.http_harness import free_port

LEFT_OUT = ["torch", "transformers", "diffusers", "safetensors", "peft", "pgserver", "huggingface_hub"]


@pytest.fixture
def image_env(tmp_path, empty_db_url):
    blocker = tmp_path / "site"
    blocker.mkdir()
    # Imported at interpreter start (site): an import of a left-out package fails as in the image.
    (blocker / "sitecustomize.py").write_text(f"import sys\nfor name in {LEFT_OUT!r}:\n    sys.modules[name] = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    env.update({
        "PYTHONPATH": str(blocker), "ACESTEP_ENV": "production", "ACESTEP_SECRET_KEY": "3f9c1a7e5b2d8046c1e9a3b7d5f20864ae1c3b5d7f9e0a2c",
        "ACESTEP_DATABASE_URL": empty_db_url, "ACESTEP_STORAGE_URL": (tmp_path / "audio").as_uri(),
        "ACESTEP_DATA_DIR": str(tmp_path / "data"), "ACESTEP_HOST": "127.0.0.1", "ACESTEP_PORT": str(free_port()),
    })
    return env


def command(name: str) -> list[str]:
    found = Path(sys.executable).parent / name
    return [str(found)] if found.exists() else [shutil.which(name) or name]


def run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def healthcheck(env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "handler.healthcheck", "--http"], env, timeout=30)


def test_the_blocker_really_blocks(image_env):
    done = run([sys.executable, "-c", "import torch"], image_env)
    assert done.returncode != 0 and "torch" in done.stderr


def test_migrate_create_key_and_serve_run_without_the_pipeline_and_the_health_check_follows(image_env):
    migrated = run(command("acestep-serverless") + ["migrate"], image_env)
    assert migrated.returncode == 0, migrated.stderr
    key = run(command("acestep-serverless") + ["create-key", "ops"], image_env)
    assert key.returncode == 0, key.stderr
    api_key = re.search(r"API key:\s+(\S+)", key.stdout).group(1)

    before = healthcheck(image_env)
    assert before.returncode == 1 and before.stdout.startswith("unhealthy:"), before.stdout

    server = subprocess.Popen(command("acestep-serverless") + ["serve"], env=image_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while (check := healthcheck(image_env)).returncode != 0:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, check.stdout
            time.sleep(0.3)
        assert check.stdout.startswith("healthy:") and "/health answered 200" in check.stdout
        base = f"http://127.0.0.1:{image_env['ACESTEP_PORT']}"
        health = httpx.get(f"{base}/health", timeout=10).json()["data"]
        assert health["status"] == "ok" and health["database"] == "ok" and health["live_workers"] == 0
        # Production: the key made by create-key is needed, and it works.
        assert httpx.get(f"{base}/v1/jobs", timeout=10).status_code == 401
        assert httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {api_key}"}, timeout=10).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert server.returncode in (0, -signal.SIGTERM)
    after = healthcheck(image_env)
    assert after.returncode == 1 and "did not answer" in after.stdout
