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


def shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def sharded_dit(folder: Path, count: int, *, written: int | None = None) -> None:
    """An XL-style DiT folder: model.safetensors.index.json naming `count` shards, the first `written` there."""
    touch(folder / "config.json", json.dumps(DIT_CONFIG))
    touch(folder / "silence_latent.pt")
    names = shard_names(count)
    index = {"metadata": {"total_size": 0}, "weight_map": {f"layer.{i}.weight": name for i, name in enumerate(names)}}
    touch(folder / "model.safetensors.index.json", json.dumps(index))
    for name in names[:count if written is None else written]:
        touch(folder / name)


def test_sharded_dit_weights_need_every_shard(tmp_path):
    root = full_layout(tmp_path)
    sharded_dit(root / "acestep-v15-xl-turbo", 2, written=1)
    found = discover(root)  # the complete turbo still loads
    assert list(found.dits) == ["acestep-v15-turbo"] and list(found.incomplete) == ["acestep-v15-xl-turbo"]
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        found.dit("acestep-v15-xl-turbo")
    touch(root / "acestep-v15-xl-turbo" / "model-00002-of-00002.safetensors")
    assert len(discover(root).dit("acestep-v15-xl-turbo").weights) == 2


def test_an_xl_style_sharded_folder_is_discovered(tmp_path):
    root = full_layout(tmp_path)
    for name in ("acestep-v15-xl-base", "acestep-v15-xl-sft", "acestep-v15-xl-turbo"):
        sharded_dit(root / name, 4)
    found = discover(root)
    assert sorted(found.dits) == ["acestep-v15-turbo", "acestep-v15-xl-base", "acestep-v15-xl-sft", "acestep-v15-xl-turbo"]
    assert found.incomplete == {}
    xl = found.dit("acestep-v15-xl-base")
    assert xl.weights == tuple(root / "acestep-v15-xl-base" / name for name in shard_names(4))


def test_an_incomplete_dit_folder_does_not_stop_the_others(tmp_path):
    root = full_layout(tmp_path)
    base = root / "acestep-v15-base"
    touch(base / "config.json", json.dumps(DIT_CONFIG))
    touch(base / "silence_latent.pt")  # the weights have not arrived
    found = discover(root, need_lm=True)
    assert list(found.dits) == ["acestep-v15-turbo"]
    assert found.dit("acestep-v15-turbo").weights == (root / "acestep-v15-turbo" / "model.safetensors",)
    assert found.incomplete == {"acestep-v15-base": [
        f"{base / 'model.safetensors'} is missing (nor is there a sharded model.safetensors.index.json)"]}
    with pytest.raises(CheckpointError, match="'acestep-v15-base' .* is incomplete") as caught:
        found.dit("acestep-v15-base")
    assert f"{base / 'model.safetensors'} is missing" in str(caught.value)
    with pytest.raises(CheckpointError, match=r"found: acestep-v15-turbo \(incomplete: acestep-v15-base\)"):
        found.dit("acestep-v15-sft")


def test_a_broken_sharded_index_is_that_dits_problem_only(tmp_path):
    root = full_layout(tmp_path)
    xl = root / "acestep-v15-xl-sft"
    sharded_dit(xl, 4)
    (xl / "model.safetensors.index.json").write_text("{not json")
    found = discover(root)
    assert list(found.dits) == ["acestep-v15-turbo"]
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not valid JSON"):
        found.dit("acestep-v15-xl-sft")


def test_shared_components_still_fail_and_so_do_dits_that_are_all_incomplete(tmp_path):
    root = full_layout(tmp_path)
    sharded_dit(root / "acestep-v15-xl-turbo", 4, written=3)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        discover(root)
    touch(root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "acestep-5Hz-lm-1.7B" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="acestep-5Hz-lm-1.7B/tokenizer.json is missing"):
        discover(root)
    touch(root / "acestep-5Hz-lm-1.7B" / "tokenizer.json")
    (root / "acestep-v15-turbo" / "model.safetensors").unlink()  # now no DiT is usable
    with pytest.raises(CheckpointError) as caught:
        discover(root)
    assert "acestep-v15-turbo/model.safetensors is missing" in str(caught.value)
    assert "model-00004-of-00004.safetensors is missing" in str(caught.value)


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


# ---- download-models (no network: the hub client is a stand-in) ----------------------------------

XL_MODELS = ("acestep-v15-xl-base", "acestep-v15-xl-sft", "acestep-v15-xl-turbo")


def fake_snapshot_download(monkeypatch, *, shards_written: int = 4) -> list[str]:
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id: str, local_dir: Path, **_) -> str:
        calls.append(repo_id)
        local_dir = Path(local_dir)
        if repo_id == "ACE-Step/Ace-Step1.5":
            full_layout(local_dir)
        else:
            sharded_dit(local_dir, 4, written=shards_written)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_the_xl_models_are_offered_and_fetched(monkeypatch, tmp_path):
    from pipeline.download import SEPARATE_REPOS, download_models

    assert {name: SEPARATE_REPOS[name] for name in XL_MODELS} == {name: f"ACE-Step/{name}" for name in XL_MODELS}
    calls = fake_snapshot_download(monkeypatch)
    found = download_models(tmp_path / "ckpt", list(XL_MODELS))
    assert calls == ["ACE-Step/Ace-Step1.5", *(f"ACE-Step/{name}" for name in XL_MODELS)]
    assert sorted(found.dits) == ["acestep-v15-turbo", *XL_MODELS]
    assert len(found.dit("acestep-v15-xl-turbo").weights) == 4


def test_an_unknown_model_fails_listing_what_is_available(monkeypatch, tmp_path):
    from pipeline.download import download_models

    calls = fake_snapshot_download(monkeypatch)
    listed = "unknown model.*acestep-v99.*available: .*acestep-v15-xl-base.*acestep-v15-xl-turbo"
    with pytest.raises(ValueError, match=listed):
        download_models(tmp_path / "ckpt", ["acestep-v15-xl-turbo", "acestep-v99"])
    assert calls == []  # refused before anything is fetched


def test_a_fetched_dit_that_came_incomplete_fails_the_download(monkeypatch, tmp_path):
    from pipeline.download import download_models

    fake_snapshot_download(monkeypatch, shards_written=3)
    with pytest.raises(CheckpointError, match="acestep-v15-xl-base/model-00004-of-00004.safetensors is missing"):
        download_models(tmp_path / "ckpt", ["acestep-v15-xl-base"])


def test_the_cli_lists_the_xl_models_and_refuses_unknown_ones(capsys, monkeypatch):
    from handler.cli import build_parser

    monkeypatch.setenv("COLUMNS", "400")  # argparse would wrap inside a name, at a hyphen
    download = build_parser()._subparsers._group_actions[0].choices["download-models"]
    help_text = " ".join(download.format_help().split())
    for name in XL_MODELS:
        assert name in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["download-models", "--with", "acestep-v99"])
    assert "acestep-v15-xl-sft" in capsys.readouterr().err
