"""Which 5 Hz LMs a worker loads and which one a request gets.

Every `acestep-5Hz-lm-*` folder of the checkpoints is loaded (ACESTEP_LM_MODELS, comma-separated,
restricts the set); a request's `lm_model_path` picks one by folder name, else the default
(ACESTEP_LM_MODEL, else the 1.7B when present, else the first by name). `lm_backend: "vllm"` runs
on the pt backend: a vllm backend is not part of this build, and one warning per process says so."""

import importlib.util
import logging
import os

import torch

from pipeline.checkpoints import Checkpoints
from pipeline.interface import PipelineError
from pipeline.lm.pt_backend import PtBackend

log = logging.getLogger(__name__)

PREFERRED_DEFAULT = "acestep-5Hz-lm-1.7B"
_vllm_warned = False


def load_lms(checkpoints: Checkpoints, *, device: torch.device, dtype: torch.dtype) -> dict[str, PtBackend]:
    wanted = [n.strip() for n in os.environ.get("ACESTEP_LM_MODELS", "").split(",") if n.strip()]
    names = wanted or sorted(checkpoints.lms)
    return {name: PtBackend.load(checkpoints.lm(name).path, device=device, dtype=dtype) for name in names}


def default_lm(lms: dict[str, PtBackend]) -> str | None:
    if not lms:
        return None
    configured = os.environ.get("ACESTEP_LM_MODEL")
    if configured:
        return configured
    return PREFERRED_DEFAULT if PREFERRED_DEFAULT in lms else sorted(lms)[0]


def select_lm(lms: dict[str, PtBackend], name: str | None, backend: str = "pt") -> PtBackend:
    """The LM a request asked for; PipelineError naming the loaded ones when it is not here."""
    global _vllm_warned
    chosen = name or default_lm(lms)
    if chosen not in lms:
        loaded = ", ".join(sorted(lms)) or "none"
        raise PipelineError(f"5 Hz LM {chosen!r} is not loaded on this worker (loaded: {loaded})")
    if backend == "vllm" and not _vllm_warned:
        _vllm_warned = True
        reason = "vllm is not installed" if importlib.util.find_spec("vllm") is None else "no vllm backend in this build"
        log.warning("lm_backend=vllm requested but %s; using the pt backend", reason)
    return lms[chosen]
