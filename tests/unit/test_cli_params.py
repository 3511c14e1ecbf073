"""The CLI's pure parts (issue 14): `submit --param` values typed by the contract's fields, `dev`'s
worker environment on tiny checkpoints, and pgserver's list of users cleared of dead processes."""

import json
import subprocess
import sys

import pytest

from handler.cli import TINY_LM_MAX_DURATION, _dev_settings, _dev_worker_env, _forget_dead_handles
from handler.client import param_value
from handler.settings import Settings
from pipeline.tiny import TINY_DITS


@pytest.mark.parametrize("name, raw, value", [
    ("time_signature", "4", "4"),  # a string field keeps the text
    ("key_scale", "null", "null"),
    ("caption", "true", "true"),
    ("vocal_language", "en", "en"),
    ("bpm", "120", 120),  # other fields get JSON
    ("audio_duration", "30.5", 30.5),
    ("thinking", "true", True),
    ("lm_top_k", "null", None),
    ("seed", "[1, 2]", [1, 2]),
    ("seed", "42,43", "42,43"),  # not JSON: as given (the API reads "42,43")
    ("audio_code_string", '["<|audio_code_1|>", "<|audio_code_2|>"]', ["<|audio_code_1|>", "<|audio_code_2|>"]),
    ("unknown_field", "5", 5),  # not in the contract: JSON as before (the API names it in its refusal)
])
def test_param_values_follow_the_field_type(name, raw, value):
    assert param_value(name, raw) == value and type(param_value(name, raw)) is type(value)


def dev_settings(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", **overrides)


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    for name in ("ACESTEP_CHECKPOINT_DIR", "ACESTEP_PIPELINE", "ACESTEP_LM_MAX_DURATION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_tiny_build(tmp_path):
    """The tiny checkpoints as already built (the banner is still printed)."""
    folder = tmp_path / "data" / "tiny-checkpoints"
    for name in TINY_DITS:
        (folder / name).mkdir(parents=True)
        (folder / name / "model.safetensors").touch()
    (folder / ".complete").write_text(json.dumps({"dits": list(TINY_DITS)}))
    return folder


def test_dev_on_tiny_checkpoints_caps_the_lms_durations_and_says_so(tmp_path, no_tiny_build, capsys):
    env = _dev_worker_env(dev_settings(tmp_path), "postgresql://db", {"PATH": "/bin"})
    assert env["ACESTEP_LM_MAX_DURATION"] == str(TINY_LM_MAX_DURATION) == "30"
    assert env["ACESTEP_CHECKPOINT_DIR"] == str(no_tiny_build) and env["ACESTEP_DATABASE_URL"] == "postgresql://db"
    assert "at most 30 s (ACESTEP_LM_MAX_DURATION)" in capsys.readouterr().out


def test_dev_keeps_the_users_lm_cap(tmp_path, no_tiny_build, capsys):
    env = _dev_worker_env(dev_settings(tmp_path, lm_max_duration=120), "postgresql://db", {})
    assert env["ACESTEP_LM_MAX_DURATION"] == "120" and "at most 120 s" in capsys.readouterr().out


def test_dev_with_real_checkpoints_leaves_the_lm_cap_alone(tmp_path):
    env = _dev_worker_env(dev_settings(tmp_path, checkpoint_dir=tmp_path / "ckpt"), "postgresql://db", {})
    assert "ACESTEP_LM_MAX_DURATION" not in env and "ACESTEP_CHECKPOINT_DIR" not in env


def test_dev_on_tiny_checkpoints_prices_jobs_as_tiny_ones_on_a_cpu(tmp_path):
    assert _dev_settings(dev_settings(tmp_path)).eta_prior == "cpu-tiny"
    assert _dev_settings(dev_settings(tmp_path, eta_prior="gpu")).eta_prior == "gpu"  # the user's word stands
    assert _dev_settings(dev_settings(tmp_path, checkpoint_dir=tmp_path / "ckpt")).eta_prior == "gpu"


def test_dead_processes_are_dropped_from_the_embedded_servers_users(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    handles = tmp_path / ".handle_pids.json"
    handles.write_text(json.dumps([dead, 1, 0x7FFFFFF0]))
    _forget_dead_handles(tmp_path)
    assert json.loads(handles.read_text()) == [1]  # init is alive; the others are gone
    _forget_dead_handles(tmp_path / "missing")  # no server yet: nothing to do
