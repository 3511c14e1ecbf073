"""The tiny checkpoints' three DiTs (turbo, base, SFT) and `dev`'s use of them: an older tiny set without
base and SFT is built again, the worker is told to serve every tiny DiT, and the banner says which."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import discover
from pipeline.dit.load import load_dit, load_silence_latent
from pipeline.tiny import TINY_DIT, TINY_DITS


def test_every_tiny_dit_is_there_with_its_own_config_weights_and_silence(tiny_checkpoints):
    assert TINY_DITS == ("acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft") and TINY_DITS[0] == TINY_DIT
    found = discover(tiny_checkpoints)
    assert sorted(found.dits) == sorted(TINY_DITS) and found.incomplete == {}
    versions = {name: (found.dit(name).config["model_version"], found.dit(name).config["is_turbo"]) for name in TINY_DITS}
    assert versions == {"acestep-v15-turbo": ("turbo", True), "acestep-v15-base": ("base", False),
                        "acestep-v15-sft": ("sft", False)}
    states = {name: load_file(str(tiny_checkpoints / name / "model.safetensors")) for name in TINY_DITS}
    assert states["acestep-v15-base"].keys() == states["acestep-v15-turbo"].keys() == states["acestep-v15-sft"].keys()
    assert all("null_condition_emb" in state for state in states.values())  # what base/SFT CFG uses
    turbo, base, sft = (states[name] for name in TINY_DITS)
    for one, other in ((turbo, base), (base, sft), (turbo, sft)):  # seeds differ, so the weights do
        assert not torch.equal(one["null_condition_emb"], other["null_condition_emb"])
    silences = [load_silence_latent(tiny_checkpoints / name) for name in TINY_DITS]
    assert all(torch.equal(silences[0], s) for s in silences[1:])


@pytest.mark.parametrize("name", ["acestep-v15-base", "acestep-v15-sft"])
def test_base_and_sft_load_strictly_and_are_not_turbo(tiny_checkpoints, name):
    dit = load_dit(tiny_checkpoints / name)
    assert not dit.config.turbo and dit.config.model_version == name.rsplit("-", 1)[1]


# ---- dev -----------------------------------------------------------------------------------------


@pytest.fixture
def dev_env(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("ACESTEP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACESTEP_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data" / "tiny-checkpoints"


@pytest.fixture
def fake_build(monkeypatch) -> list[Path]:
    """build_tiny_checkpoints as folders with a weights file each: what `dev` checks, without torch's time."""
    import pipeline.tiny

    built = []

    def build(root: Path, **_) -> Path:
        built.append(root)
        for name in TINY_DITS:
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "model.safetensors").write_bytes(b"")
        return root

    monkeypatch.setattr(pipeline.tiny, "build_tiny_checkpoints", build)
    return built


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    from handler.cli import _dev_worker_env, _settings

    settings = _settings()
    return _dev_worker_env(settings, "postgresql://dev", dict(os.environ) if environ is None else environ)


def test_dev_builds_once_and_serves_every_tiny_dit(dev_env, fake_build, capsys):
    env = worker_env()
    assert fake_build == [dev_env] and env["ACESTEP_CHECKPOINT_DIR"] == str(dev_env)
    assert env["ACESTEP_DIT_MODELS"] == "acestep-v15-turbo,acestep-v15-base,acestep-v15-sft"
    assert json.loads((dev_env / ".complete").read_text()) == {"dits": list(TINY_DITS)}
    out = capsys.readouterr().out
    assert "TINY RANDOM" in out and "serves the DiTs acestep-v15-turbo, acestep-v15-base, acestep-v15-sft" in out
    worker_env()
    assert fake_build == [dev_env]  # built once


def test_dev_keeps_the_users_dit_models(dev_env, fake_build, capsys, monkeypatch):
    monkeypatch.setenv("ACESTEP_DIT_MODELS", "acestep-v15-sft")
    env = worker_env()
    assert env["ACESTEP_DIT_MODELS"] == "acestep-v15-sft"
    assert "serves the DiTs acestep-v15-turbo, acestep-v15-sft (" in capsys.readouterr().out


def test_dev_builds_an_older_tiny_set_again(dev_env, fake_build):
    (dev_env / "acestep-v15-turbo").mkdir(parents=True)
    (dev_env / "acestep-v15-turbo" / "model.safetensors").write_bytes(b"")
    (dev_env / ".complete").touch()  # what a build before base and SFT left: an empty marker
    env = worker_env()
    assert fake_build == [dev_env] and env["ACESTEP_DIT_MODELS"].split(",") == list(TINY_DITS)
    (dev_env / "acestep-v15-sft" / "model.safetensors").unlink()  # a marker naming a folder that is gone
    worker_env()
    assert fake_build == [dev_env, dev_env]


def test_an_older_tiny_set_is_completed_for_real_and_turbo_keeps_its_weights(dev_env, capsys):
    from pipeline.tiny import build_tiny_checkpoints

    build_tiny_checkpoints(dev_env, with_lm=False)
    turbo = load_file(str(dev_env / TINY_DIT / "model.safetensors"))
    for name in TINY_DITS[1:]:  # the layout of a set built before this change
        for path in (dev_env / name).iterdir():
            path.unlink()
        (dev_env / name).rmdir()
    (dev_env / ".complete").touch()
    worker_env()
    found = discover(dev_env, need_lm=True)
    assert sorted(found.dits) == sorted(TINY_DITS)
    again = load_file(str(dev_env / TINY_DIT / "model.safetensors"))
    assert all(torch.equal(turbo[key], again[key]) for key in turbo)
