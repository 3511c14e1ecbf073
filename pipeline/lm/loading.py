"""Which 5 Hz LMs a worker loads and which backend a request gets.

Every `acestep-5Hz-lm-*` folder of the checkpoints is loaded on the pt backend (PipelineOptions.lm_models,
from ACESTEP_LM_MODELS, restricts the set); a request's `lm_model_path` picks one by folder name, else the
default (PipelineOptions.lm_model, else the 1.7B when present, else the first by name).

`lm_backend: "vllm"` (the API's default) uses the `VllmEngines` of the pipeline: a vllm engine per LM
(taking PipelineOptions.vllm_gpu_memory_utilization of the GPU), none when vllm is turned off.
When vllm is not installed, there is no CUDA, or the engine fails to start, the request runs on
the pt backend and one warning per LM says why; a vllm engine that fails mid-request is retired
the same way and that request is redone on pt."""

import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.checkpoints import Checkpoints
from pipeline.interface import Canceled, PipelineError
from pipeline.lm.backend import CodesRequest, LMBackend, MetadataRequest, TextRequest, TokenReport
from pipeline.lm.prompts import MAX_MODEL_LEN
from pipeline.lm.pt_backend import PtBackend
from pipeline.lm.vllm_backend import VllmBackend

log = logging.getLogger(__name__)

PREFERRED_DEFAULT = "acestep-5Hz-lm-1.7B"


def load_lms(checkpoints: Checkpoints, names: Sequence[str] = (), *, device: torch.device, dtype: torch.dtype) -> dict[str, PtBackend]:
    """The LMs `names` (every one in the checkpoints when empty) on the pt backend."""
    return {name: PtBackend.load(checkpoints.lm(name).path, device=device, dtype=dtype) for name in names or sorted(checkpoints.lms)}


def default_lm(lms: dict[str, PtBackend]) -> str | None:
    """Without a configured default: the 1.7B when loaded, else the first by name."""
    if not lms:
        return None
    return PREFERRED_DEFAULT if PREFERRED_DEFAULT in lms else sorted(lms)[0]


def vllm_available() -> bool:
    """vllm installed and CUDA present: worth starting engines with the worker."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def start_vllm(pt: PtBackend, gpu_memory_utilization: float = 0.3) -> VllmBackend:
    """A vllm engine for the LM `pt` was loaded from; raises with the reason when it cannot start."""
    if pt.path is None:
        raise RuntimeError("the LM was not loaded from a checkpoint folder")
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vllm is not installed (the gpu extra)")
    if not torch.cuda.is_available():
        raise RuntimeError("vllm needs CUDA and this worker has none")
    return VllmBackend.start(pt.path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=MAX_MODEL_LEN)


class _VllmWithFallback:
    """A vllm backend that redoes a failed call on pt and retires itself (one warning). A canceled
    call is not a failure: `Canceled` passes through."""

    def __init__(self, vllm: VllmBackend, pt: PtBackend, retire: Callable[[Exception], None]):
        self.name = pt.name
        self.backend = vllm.backend  # "pt" once a call had to be redone there
        self.vllm, self.pt, self.retire = vllm, pt, retire

    def _call(self, method: str, request: Any, report: TokenReport | None) -> Any:
        if self.backend == self.vllm.backend:
            try:
                return getattr(self.vllm, method)(request, report)
            except Canceled:
                raise
            except Exception as exc:  # noqa: BLE001 - any engine fault: the pt backend still answers
                self.retire(exc)
                self.backend = self.pt.backend
        return getattr(self.pt, method)(request, report)

    def generate_metadata(self, request: MetadataRequest, report: TokenReport | None = None) -> str:
        return self._call("generate_metadata", request, report)

    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]:
        return self._call("generate_codes", requests, report)

    def generate_text(self, request: TextRequest, report: TokenReport | None = None) -> str:
        return self._call("generate_text", request, report)


class VllmEngines:
    """vllm engines started on first use, one per LM; an LM whose engine could not start (or
    failed) stays on pt, with one warning."""

    def __init__(self, gpu_memory_utilization: float = 0.3, *, starter: Callable[[PtBackend], VllmBackend] | None = None):
        self.starter = starter or (lambda pt: start_vllm(pt, gpu_memory_utilization))
        self._engines: dict[str, VllmBackend | None] = {}
        self._lock = threading.Lock()

    def backend(self, pt: PtBackend) -> LMBackend:
        with self._lock:
            if pt.name not in self._engines:
                try:
                    self._engines[pt.name] = self.starter(pt)
                    log.info("5 Hz LM %s: vllm engine started", pt.name)
                except Exception as exc:  # noqa: BLE001 - any reason vllm cannot start means pt
                    self._engines[pt.name] = None
                    log.warning("lm_backend=vllm for %s: vllm cannot start (%s); using the pt backend", pt.name, exc)
            engine = self._engines[pt.name]
        if engine is None:
            return pt

        def retire(exc: Exception) -> None:
            with self._lock:
                if self._engines.get(pt.name) is engine:
                    self._engines[pt.name] = None
                    log.warning("lm_backend=vllm for %s: the vllm engine failed (%s); using the pt backend from now on",
                                pt.name, exc)

        return _VllmWithFallback(engine, pt, retire)


def select_lm(lms: dict[str, PtBackend], name: str | None, backend: str = "pt",
              engines: VllmEngines | None = None) -> LMBackend:
    """The LM a request asked for on the backend it asked for (pt when `engines` is None: vllm is
    turned off); PipelineError naming the loaded ones when it is not here."""
    chosen = name or default_lm(lms)
    if chosen not in lms:
        loaded = ", ".join(sorted(lms)) or "none"
        raise PipelineError(f"5 Hz LM {chosen!r} is not loaded on this worker (loaded: {loaded})")
    if backend == "vllm" and engines is not None:
        return engines.backend(lms[chosen])
    return lms[chosen]
