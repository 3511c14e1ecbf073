"""`python -m handler.healthcheck`, the worker image's HEALTHCHECK and its entry point's weights check, run
for real on the tiny checkpoints (the real layout) and on broken or missing ones, with fresh, stale and
missing heartbeat files; and `beat()`, which the worker calls."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handler import healthcheck
from handler.healthcheck import HEARTBEAT_STALE_SECONDS, beat

ROOT = Path(__file__).resolve().parents[2]


def env_for(checkpoints: Path | None, health_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    if checkpoints is not None:
        env["ACESTEP_CHECKPOINT_DIR"] = str(checkpoints)
    return env | {"ACESTEP_HEALTH_FILE": str(health_file)} | extra


def health(env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "handler.healthcheck", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.count("\n") == 1 and not done.stderr, (done.stdout, done.stderr)  # one line, always
    return done.returncode, done.stdout.strip()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_tiny_checkpoints_are_loadable_weights(tiny_checkpoints, tmp_path):
    code, line = health(env_for(tiny_checkpoints, tmp_path / "alive"), "--weights-only")
    assert code == 0, line
    assert line == f"healthy: checkpoints in {tiny_checkpoints}: DiT acestep-v15-turbo; LM none"


def test_no_heartbeat_yet_then_fresh_then_stale(tiny_checkpoints, tmp_path):
    alive = tmp_path / "alive"
    env = env_for(tiny_checkpoints, alive)
    code, line = health(env)
    assert code == 1 and line.startswith("unhealthy: no worker heartbeat yet") and str(alive) in line
    beat(alive)
    code, line = health(env)
    assert code == 0 and "worker heartbeat 0 s ago" in line, line
    age(alive, HEARTBEAT_STALE_SECONDS - 10)
    assert health(env)[0] == 0
    age(alive, HEARTBEAT_STALE_SECONDS + 10)
    code, line = health(env)
    assert code == 1 and line.startswith("unhealthy: worker heartbeat is stale") and f"limit {HEARTBEAT_STALE_SECONDS:.0f} s" in line
    assert health(env, "--weights-only")[0] == 0  # what the entry point asks before a start
    beat(alive)  # a worker that comes back
    assert health(env)[0] == 0


def test_a_fresh_heartbeat_does_not_hide_missing_weights(tmp_path):
    alive = tmp_path / "alive"
    beat(alive)
    (tmp_path / "empty").mkdir()
    code, line = health(env_for(tmp_path / "empty", alive))
    assert code == 1 and "no DiT checkpoint" in line and f"{tmp_path / 'empty'}/vae is missing" in line


@pytest.mark.parametrize("case,expected", [
    ("unset", "ACESTEP_CHECKPOINT_DIR is not set"),
    ("missing", "does not exist"),
    ("no vae weights", "vae/diffusion_pytorch_model.safetensors is missing"),
    ("other dit", "no DiT checkpoint 'acestep-v15-xl-base'"),
    ("lm asked for", "no 5 Hz LM checkpoint 'acestep-5Hz-lm-1.7B'"),
])
def test_unloadable_weights_are_unhealthy_with_the_reason(tiny_checkpoints, tmp_path, case, expected):
    alive = tmp_path / "alive"
    beat(alive)
    extra, folder = {}, tiny_checkpoints
    if case == "unset":
        folder = None
    elif case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "no vae weights":
        folder = tmp_path / "copy"
        shutil.copytree(tiny_checkpoints, folder)
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif case == "other dit":
        extra = {"ACESTEP_DIT_MODEL": "acestep-v15-xl-base"}
    elif case == "lm asked for":
        extra = {"ACESTEP_LM_MODELS": "acestep-5Hz-lm-1.7B"}
    for args in ((), ("--weights-only",)):
        code, line = health(env_for(folder, alive, **extra), *args)
        assert code == 1 and line.startswith("unhealthy: ") and expected in line, line


def test_a_fake_pipeline_needs_no_weights_but_still_a_heartbeat(tmp_path):
    alive = tmp_path / "alive"
    env = env_for(tmp_path / "nowhere", alive, ACESTEP_PIPELINE="tests.fakes.pipelines:ok")
    code, line = health(env, "--weights-only")
    assert code == 0 and "weights not checked" in line
    assert health(env)[0] == 1
    beat(alive)
    assert health(env)[0] == 0


def test_bad_configuration_is_unhealthy_and_names_the_variable(tiny_checkpoints, tmp_path):
    code, line = health(env_for(tiny_checkpoints, tmp_path / "alive", ACESTEP_DIT_MODEL="turbo"), "--weights-only")
    assert code == 1 and line.startswith("unhealthy: bad configuration: ACESTEP_DIT_MODEL")


def test_beat_creates_and_refreshes_the_file_and_never_raises(tmp_path, monkeypatch):
    alive = tmp_path / "alive"
    beat(alive)
    assert alive.is_file()
    age(alive, 500)
    beat(alive)
    assert time.time() - alive.stat().st_mtime < 5
    monkeypatch.setenv("ACESTEP_HEALTH_FILE", str(tmp_path / "from-env"))
    beat()
    assert (tmp_path / "from-env").is_file()
    assert healthcheck.health_file() == tmp_path / "from-env"
    monkeypatch.delenv("ACESTEP_HEALTH_FILE")
    assert healthcheck.health_file() == Path("/tmp/acestep-worker.alive")
    beat(tmp_path / "no-such-folder" / "alive")  # cannot be written: no exception
    beat(tmp_path)  # a folder: no exception
    assert not (tmp_path / "no-such-folder").exists()
