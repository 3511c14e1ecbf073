"""The `submit` client against a live API, and `download-models`' layout check (no network)."""

import json
import sys
import types
from pathlib import Path

import pytest
import soundfile

from handler.cli import main
from handler.settings import Settings
from pipeline.checkpoints import CheckpointError
from pipeline.download import download_models
from tests.integration.http_harness import FakeWorker, audio_bytes, free_port, start_api


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path / "data", port=free_port()), db_url)
    yield live
    live.stop()


def test_submit_waits_and_downloads(api, tmp_path, capsys):
    source = tmp_path / "song.wav"
    source.write_bytes(audio_bytes("wav"))
    with FakeWorker(api.services.store, api.services.storage):
        code = main(["submit", "--url", api.url, "--caption", "upbeat pop song", "--format", "flac",
                     "--param", "batch_size=1", "--task", "cover", "--src", str(source), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [path] = [Path(line) for line in captured.out.split()]
    assert path.suffix == ".flac" and soundfile.info(str(path)).channels == 2
    # The fake worker may claim the job before the submit answers: either answer is consistent.
    assert ("queued at position 1" in captured.err or "running at position 0" in captured.err), captured.err
    assert "succeeded" in captured.err


def test_submit_reports_a_refusal(api, tmp_path, capsys):
    code = main(["submit", "--url", api.url, "--param", "bpm=1000", "--out", str(tmp_path)])
    assert code == 1 and "HTTP 422" in capsys.readouterr().err


def fake_hub(monkeypatch, layout):
    calls = []

    def snapshot_download(repo_id, local_dir):
        calls.append(repo_id)
        layout(Path(local_dir), repo_id)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def main_repo_layout(root: Path, repo_id: str) -> None:
    def touch(path: Path, text: str = "{}") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    if repo_id == "ACE-Step/Ace-Step1.5":
        touch(root / "acestep-v15-turbo" / "config.json", json.dumps({"model_type": "acestep"}))
        for name in ("model.safetensors", "silence_latent.pt"):
            touch(root / "acestep-v15-turbo" / name)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            touch(root / "vae" / name)
        for folder in ("Qwen3-Embedding-0.6B", "acestep-5Hz-lm-1.7B"):
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
                touch(root / folder / name)
    else:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            touch(root / name)


def test_download_models_fetches_the_layout_and_checks_it(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, main_repo_layout)
    found = download_models(tmp_path / "ckpt", ["acestep-5Hz-lm-4B"])
    assert calls == ["ACE-Step/Ace-Step1.5", "ACE-Step/acestep-5Hz-lm-4B"]
    assert list(found.dits) == ["acestep-v15-turbo"] and sorted(found.lms) == ["acestep-5Hz-lm-1.7B", "acestep-5Hz-lm-4B"]
    with pytest.raises(ValueError, match="available"):
        download_models(tmp_path / "ckpt", ["acestep-v99"])


def test_an_incomplete_download_says_what_is_missing(monkeypatch, tmp_path):
    fake_hub(monkeypatch, lambda root, repo: (root / "vae").mkdir(parents=True, exist_ok=True))
    with pytest.raises(CheckpointError, match="no DiT checkpoint"):
        download_models(tmp_path / "ckpt")
