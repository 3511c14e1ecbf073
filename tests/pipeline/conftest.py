"""The pipeline tier's session fixtures: tiny random checkpoints and the tiny 5 Hz LM, built once."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pt_lm(tmp_path_factory):
    """The tiny random 5 Hz LM on the pt backend (CPU, float32), built once per session."""
    import torch

    from pipeline.lm.pt_backend import PtBackend
    from pipeline.tiny_text import build_tiny_lm

    path = build_tiny_lm(tmp_path_factory.mktemp("lm") / "acestep-5Hz-lm-0.6B")
    return PtBackend.load(path, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """Tiny random checkpoints in the real layout, built once per test session (no 5 Hz LM)."""
    from pipeline.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"), with_lm=False)
