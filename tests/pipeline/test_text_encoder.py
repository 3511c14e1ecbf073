"""TextEncoder and the tiny text checkpoints, built offline in tmp folders and loaded like the real ones."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from pipeline.prompts import caption_prompt, format_metas, lyric_prompt
from pipeline.text_encoder import TextEncoder
from pipeline.tiny_text import CHAT_TEMPLATE_PATH, build_tiny_lm, build_tiny_text_encoder, build_tokenizer

FIXTURE_DIR = Path(os.environ.get("ACESTEP_PROMPTS_FIXTURE", Path(__file__).parents[1] / "fixtures" / "prompts"))
ZH_EMOJI = "[Verse 1]\n月光洒在窗台上\n思念像风一样长 🎵🔥👩‍🎤\n\n[Chorus]\n夜空に光る星 ½ café\n"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("Qwen3-Embedding-0.6B"), seed=0)


@pytest.fixture(scope="module")
def encoder(encoder_dir: Path) -> TextEncoder:
    return TextEncoder.load(encoder_dir)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("acestep-5Hz-lm-tiny"), seed=0)


@pytest.fixture(scope="module")
def lm_tokenizer(lm_dir: Path):
    return AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)


def test_encoder_folder_loads_without_missing_or_unexpected_keys(encoder_dir: Path) -> None:
    names = {p.name for p in encoder_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    _, info = AutoModel.from_pretrained(encoder_dir, local_files_only=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


def test_encode_text_pads_right_and_masks_padding(encoder: TextEncoder) -> None:
    short = caption_prompt("Fill the audio semantic mask based on the given conditions:", "Jazz", format_metas())
    long = caption_prompt("Repaint the mask area", "A long caption about a slow evolving ambient piece " * 3, format_metas(120))
    hidden, mask = encoder.encode_text([short, long])
    ids, _ = encoder.tokenize([short, long], 256)
    n_short = len(encoder.tokenizer(short)["input_ids"])
    assert hidden.shape == (2, mask.shape[1], encoder.hidden_size) and mask.dtype == torch.int64
    assert mask[1].all() and mask[0, :n_short].all() and not mask[0, n_short:].any()
    assert (ids[0, n_short:] == encoder.tokenizer.pad_token_id).all()
    # The tokenizer appends <|endoftext|> like the real Qwen3-Embedding one.
    assert encoder.tokenizer.convert_ids_to_tokens(int(ids[0, n_short - 1])) == "<|endoftext|>"
    # Right padding under causal attention leaves the valid positions as if encoded alone.
    alone, _ = encoder.encode_text([short])
    torch.testing.assert_close(hidden[0, :n_short], alone[0], rtol=1e-5, atol=1e-5)


def test_caption_truncated_to_256_tokens_keeping_the_start(encoder: TextEncoder) -> None:
    prompt = caption_prompt("Fill the mask:", "la di da " * 400, format_metas())
    hidden, mask = encoder.encode_text([prompt, "short"])
    full = encoder.tokenizer(prompt)["input_ids"]
    ids, _ = encoder.tokenize([prompt], 256)
    assert len(full) > 256 and hidden.shape[1] == 256 and mask[0].all()
    assert ids[0, :200].tolist() == full[:200]


def test_embed_lyrics_is_the_embedding_table_truncated_to_2048(encoder: TextEncoder) -> None:
    prompts = [lyric_prompt("la " * 3000, "en"), lyric_prompt(ZH_EMOJI, "zh")]
    embeddings, mask = encoder.embed_lyrics(prompts)
    ids, expected_mask = encoder.tokenize(prompts, 2048)
    assert embeddings.shape == (2, 2048, encoder.hidden_size) and mask.dtype == torch.int64
    assert torch.equal(mask, expected_mask) and mask[0].all() and not mask[1].all()
    assert torch.equal(embeddings, encoder.model.embed_tokens.weight[ids])


def test_tokenizer_round_trips_any_text(encoder: TextEncoder) -> None:
    tokenizer = encoder.tokenizer
    ids = tokenizer(ZH_EMOJI, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == ZH_EMOJI
    prompt = lyric_prompt(ZH_EMOJI, "zh")
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids) == prompt + "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in ids[-1:]
    assert max(ids) < len(tokenizer)


def test_tokenizer_build_is_deterministic() -> None:
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_tiny_lm_loads_with_audio_code_tokens(lm_dir: Path, lm_tokenizer) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = lm_tokenizer
    assert model.config.vocab_size == len(tokenizer)
    code = tokenizer.convert_tokens_to_ids("<|audio_code_123|>")
    assert tokenizer("<think>\n</think><|audio_code_123|>", add_special_tokens=False)["input_ids"][-1:] == [code]
    assert tokenizer.tokenize("x<|audio_code_63999|>y") == ["x", "<|audio_code_63999|>", "y"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    logits = model(input_ids=torch.tensor([[code, tokenizer.eos_token_id]])).logits
    assert logits.shape == (1, 2, len(tokenizer))


def test_tiny_lm_renders_the_copied_chat_template(lm_tokenizer) -> None:
    tokenizer = lm_tokenizer
    assert tokenizer.chat_template == CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    messages = [{"role": "system", "content": "# Instruction\nX:\n\n"}, {"role": "user", "content": "# Caption\nJazz\n"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\n# Instruction\nX:\n\n<|im_end|>\n"
        "<|im_start|>user\n# Caption\nJazz\n<|im_end|>\n<|im_start|>assistant\n"
    )
    fixture = FIXTURE_DIR / "prompts.json"
    if not fixture.is_file():
        pytest.skip(f"prompt fixtures not found at {fixture}; the fixture prompts were not rendered")
    assert CHAT_TEMPLATE_PATH.read_bytes() == (FIXTURE_DIR / "qwen3_chat_template.jinja").read_bytes()
    for case in json.loads(fixture.read_text(encoding="utf-8"))["cases"]:
        for phase in ("phase1", "phase2"):
            step = case["lm"].get(phase, {})
            if "chat_messages" in step:
                assert tokenizer.apply_chat_template(step["chat_messages"], **step["chat_template_kwargs"]) == step["prompt"]
