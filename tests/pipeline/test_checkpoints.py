"""Checkpoint discovery in the Hugging Face layout, and what it says when pieces are missing."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.checkpoints import CheckpointError, discover

FIXTURE_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dit-reference" / "config.json"
DIT_CONFIG = json.loads(FIXTURE_CONFIG.read_text()) if FIXTURE_CONFIG.exists() else {"model_type": "acestep"}


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def full_layout(root: Path) -> Path:
    touch(root / "acestep-v15-turbo" / "config.json", json.dumps(DIT_CONFIG))
    touch(root / "acestep-v15-turbo" / "model.safetensors")
    touch(root / "acestep-v15-turbo" / "silence_latent.pt")
    touch(root / "vae" / "config.json", json.dumps({"_class_name": "AutoencoderOobleck"}))
    touch(root / "vae" / "diffusion_pytorch_model.safetensors")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        touch(root / "Qwen3-Embedding-0.6B" / name, "{}")
        touch(root / "acestep-5Hz-lm-1.7B" / name, "{}")
    return root


def test_a_complete_layout_is_found(tmp_path):
    found = discover(full_layout(tmp_path), need_lm=True)
    assert list(found.dits) == ["acestep-v15-turbo"]
    assert found.dit("acestep-v15-turbo").config["model_type"] == "acestep"
    assert found.vae.weights == (tmp_path / "vae" / "diffusion_pytorch_model.safetensors",)
    assert found.text_encoder.path == tmp_path / "Qwen3-Embedding-0.6B"
    assert list(found.lms) == ["acestep-5Hz-lm-1.7B"]


def test_sharded_dit_weights_need_every_shard(tmp_path):
    root = full_layout(tmp_path)
    xl = root / "acestep-v15-xl-turbo"
    touch(xl / "config.json", json.dumps(DIT_CONFIG))
    touch(xl / "silence_latent.pt")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    touch(xl / "model.safetensors.index.json", json.dumps(index))
    touch(xl / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        discover(root)
    touch(xl / "model-00002-of-00002.safetensors")
    assert len(discover(root).dit("acestep-v15-xl-turbo").weights) == 2


def test_every_missing_piece_is_named_at_once(tmp_path):
    root = full_layout(tmp_path)
    (root / "acestep-v15-turbo" / "silence_latent.pt").unlink()
    shutil.rmtree(root / "vae")
    (root / "Qwen3-Embedding-0.6B" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as caught:
        discover(root)
    message = str(caught.value)
    assert "silence_latent.pt is missing" in message
    assert f"{root / 'vae'} is missing" in message
    assert "Qwen3-Embedding-0.6B/tokenizer.json is missing" in message


def test_unknown_names_and_absent_directories(tmp_path):
    found = discover(full_layout(tmp_path))
    with pytest.raises(CheckpointError, match="found: acestep-v15-turbo"):
        found.dit("acestep-v15-base")
    with pytest.raises(CheckpointError, match="acestep-5Hz-lm-1.7B"):
        found.lm("acestep-5Hz-lm-4B")
    with pytest.raises(CheckpointError, match="does not exist"):
        discover(tmp_path / "nowhere")
    shutil.rmtree(tmp_path / "acestep-v15-turbo")
    with pytest.raises(CheckpointError, match="no DiT checkpoint"):
        discover(tmp_path)
