"""The pt backend on a tiny random LM: whatever the random weights say, constrained decoding gives
a parseable block with valid values, user values kept, and exactly n audio codes."""

import re

import pytest
import torch

from pipeline.lm import decoding
from pipeline.lm.backend import CodesRequest, MetadataRequest, Sampling
from pipeline.lm.constrained import VALID_KEYSCALES, VALID_LANGUAGES, VALID_TIME_SIGNATURES
from pipeline.lm.decoding import sample_token

PROMPT = "<|im_start|>user\n# Caption\nslow jazz\n<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def lm(tiny_pt_lm):
    return tiny_pt_lm


@pytest.fixture(autouse=True)
def short_captions(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_CAPTION_TOKENS", 24)  # random weights rarely end a line on their own


def fields(text: str) -> dict[str, str]:
    block = text.removeprefix("<think>\n").removesuffix("<|im_end|>")
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+): ?(.*)$", block, re.M)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metadata_block_is_valid_whatever_the_weights(lm, seed):
    out = lm.generate_metadata(MetadataRequest(PROMPT, PROMPT, cfg_scale=1.0, max_new_tokens=600, seed=seed,
                                               sampling=Sampling(temperature=1.5, top_p=None)))
    assert out.startswith("<think>\nbpm: ") and out.endswith("\n<|im_end|>")
    got = fields(out)
    assert list(got) == ["bpm", "caption", "duration", "keyscale", "language", "timesignature"]  # genres skipped
    assert 30 <= int(got["bpm"]) <= 300 and 10 <= int(got["duration"]) <= 600
    assert got["keyscale"] in VALID_KEYSCALES and got["language"] in VALID_LANGUAGES
    assert got["timesignature"] in VALID_TIME_SIGNATURES


def test_user_values_are_written_and_skips_honoured(lm):
    out = lm.generate_metadata(MetadataRequest(
        PROMPT, PROMPT, cfg_scale=1.0, max_new_tokens=600, seed=5, skip_caption=True, skip_language=True,
        user_metadata={"bpm": 72, "keyscale": "G\u266d minor", "duration": 95}, max_duration=120,
    ))
    got = fields(out)
    assert got["bpm"] == "72" and got["keyscale"] == "G\u266d minor" and got["duration"] == "95"
    assert "caption" not in got and "language" not in got and got["timesignature"] in VALID_TIME_SIGNATURES


def test_duration_respects_the_maximum(lm):
    for seed in range(3):
        out = lm.generate_metadata(MetadataRequest(PROMPT, PROMPT, cfg_scale=1.0, max_new_tokens=600, seed=seed,
                                                   skip_caption=True, max_duration=12, sampling=Sampling(temperature=2.0)))
        assert 10 <= int(fields(out)["duration"]) <= 12


def test_same_seed_same_tokens_and_cfg_path_runs(lm):
    request = MetadataRequest(PROMPT, "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", cfg_scale=2.0,
                              max_new_tokens=600, seed=11)
    assert lm.generate_metadata(request) == lm.generate_metadata(request)


def test_exactly_n_codes_then_the_end_with_cfg_in_one_batch(lm):
    requests = [CodesRequest(PROMPT + "<think>\n</think>\n\n", "<think>\n</think>\n\n", cfg_scale=2.5, n_codes=n,
                             max_new_tokens=n + 10, seed=s, sampling=Sampling(top_k=50, repetition_penalty=1.3))
                for n, s in ((15, 1), (7, 2))]
    outs = lm.generate_codes(requests)
    for out, request in zip(outs, requests, strict=True):
        codes = re.findall(r"<\|audio_code_(\d+)\|>", out)
        assert len(codes) == request.n_codes and all(0 <= int(c) < 64000 for c in codes)
        assert out == "".join(f"<|audio_code_{c}|>" for c in codes) + "<|im_end|>"
    assert lm.generate_codes(requests) == outs  # seeded
    assert lm.generate_codes([requests[0]])[0] == outs[0]  # an item does not depend on its batch


def test_sampling_order_and_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert sample_token(logits, None, Sampling(temperature=0), [], None) == 1
    assert sample_token(logits, torch.tensor([0, 3]), Sampling(temperature=0), [], None) == 0
    assert sample_token(logits, None, Sampling(temperature=0, repetition_penalty=4.0), [1], None) == 2
    g = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, None, Sampling(temperature=5.0, top_k=2, top_p=None), [], g) for _ in range(50)}
    assert picks == {1, 2}
    picks = {sample_token(logits, None, Sampling(temperature=5.0, top_p=0.5), [], g) for _ in range(50)}
    assert picks == {1}  # the top token alone already passes 0.5
