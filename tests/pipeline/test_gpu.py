"""GPU checks (`pytest -m gpu`; skipped where no CUDA device is present): the bf16 fast path agrees
with float32 on the reference fixture, and full-size random-weight models run 60 s of audio."""

from pathlib import Path

import pytest
import torch

from pipeline import conformance
from pipeline.dit.load import load_dit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dit-reference"


def test_reference_fixture_on_cuda_float32_and_bfloat16():
    cpu = conformance.run(FIXTURE)
    assert all(o.passed for o in cpu)
    model32 = load_dit(FIXTURE, device="cuda", dtype=torch.float32)
    model16 = load_dit(FIXTURE, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 37, 8, device="cuda")
    t = torch.tensor([1.0, 0.3], device="cuda")
    states = torch.randn(2, 23, 64, device="cuda")
    context = torch.randn(2, 37, 16, device="cuda")
    with torch.inference_mode():
        v32 = model32.decoder(x, t, t, states, context)
        v16 = model16.decoder(x.bfloat16(), t.bfloat16(), t.bfloat16(), states.bfloat16(), context.bfloat16())
    assert (v16.float() - v32).abs().max().item() < 0.1 * v32.abs().max().item()


def test_full_size_sixty_seconds_batch_of_two():
    from benchmarks.pipeline_speed import build, measure

    device = torch.device("cuda")
    dit, vae = build("full", device, torch.bfloat16)
    row = measure(dit, vae, 60.0, 2, device, torch.bfloat16, repeat=1)
    assert row["total_s"] > 0 and row["peak_gib"] < torch.cuda.get_device_properties(device).total_memory / 2**30


def test_vllm_engine_on_the_tiny_lm(tmp_path):
    """A real vllm engine (the gpu extra) with our logits processor: valid metadata and exactly n codes
    with CFG (the tokens cannot be compared with pt: bf16 kernels differ)."""
    pytest.importorskip("vllm")
    import re

    from pipeline.lm.backend import CodesRequest, MetadataRequest
    from pipeline.lm.constrained import VALID_TIME_SIGNATURES
    from pipeline.lm.vllm_backend import VllmBackend
    from pipeline.tiny_text import build_tiny_lm

    path = build_tiny_lm(tmp_path / "acestep-5Hz-lm-0.6B", hidden_size=256)
    backend = VllmBackend.start(path, gpu_memory_utilization=0.2, max_model_len=4096)
    prompt = "<|im_start|>user\n# Caption\nslow jazz\n<|im_end|>\n<|im_start|>assistant\n"
    meta = backend.generate_metadata(MetadataRequest(prompt, prompt, cfg_scale=1.0, max_new_tokens=3000, seed=1,
                                                     skip_caption=True, user_metadata={"bpm": 80}))
    assert meta.startswith("<think>\nbpm: 80\nduration: ") and meta.endswith("<|im_end|>")
    assert re.search(r"^timesignature: (.*)$", meta, re.M).group(1) in VALID_TIME_SIGNATURES
    requests = [CodesRequest(prompt, "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", cfg_scale=2.0,
                             n_codes=n, max_new_tokens=n + 10, seed=n) for n in (50, 300, 17)]
    for out, request in zip(backend.generate_codes(requests), requests, strict=True):
        assert len(re.findall(r"<\|audio_code_\d+\|>", out)) == request.n_codes and out.endswith("<|im_end|>")
