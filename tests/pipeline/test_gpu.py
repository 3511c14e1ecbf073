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
