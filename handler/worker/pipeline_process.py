"""The pipeline in a supervised child process. Models load once in the child; each job is a request
message; the child reports progress, and writes the encoded audio files itself (no large arrays
cross the pipe). If the child dies (segfault, CUDA abort, OOM kill) or hangs past the deadline, the
parent turns that into a job error naming what happened and starts a fresh child for the next job.

The pipeline is loaded from a factory `module:callable` (ACESTEP_PIPELINE), called with the
checkpoint directory (ACESTEP_CHECKPOINT_DIR, or None), returning an object with
`run(request: dict, progress: Callable[[str, float], None]) -> GeneratedAudio` and optionally
`run_batch(requests: list[dict], progress) -> list[GeneratedAudio]` for jobs that share one GPU
batch; `progress` raises `Canceled` once the run should stop, so cancellation is between stages.
"""

import importlib
import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio_io import SAMPLE_RATE, AudioError, encode_audio
from pipeline.interface import Canceled, GeneratedAudio, OutOfMemory, PipelineError

__all__ = ["SAMPLE_RATE", "Canceled", "GeneratedAudio", "OutOfMemory", "PipelineError", "PipelineProcess"]




class PipelineCrashed(PipelineError):
    """The pipeline process died."""


class PipelineTimeout(PipelineError):
    """The pipeline ran past the job's deadline and was stopped."""


@dataclass
class Finished:
    files: list[Path]
    info: dict[str, Any]


def load_factory(spec: str) -> Callable[[], Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"ACESTEP_PIPELINE must be module:callable, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _child_main(spec: str, checkpoint_dir: str | None, conn, cancel_flag) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    try:
        pipeline = load_factory(spec)(Path(checkpoint_dir) if checkpoint_dir else None)
    except Exception as exc:  # any failure to load is reported as SETUP_FAILED, not a crash
        conn.send(("setup_failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.send(("ready", [str(m) for m in getattr(pipeline, "models", ())]))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        _, requests, out_dir = message

        def progress(stage: str, fraction: float) -> None:
            if cancel_flag.is_set():
                raise Canceled()
            conn.send(("progress", stage, float(fraction)))

        try:
            generated = _generate(pipeline, requests, progress)
            progress("encoding", 0.97)
            finished = []
            for index, (request, audio) in enumerate(zip(requests, generated, strict=True)):
                files = []
                for i, samples in enumerate(audio.audios):
                    path = Path(out_dir) / f"{index}-output-{i}.{request['audio_format']}"
                    try:
                        encode_audio(np.asarray(samples), audio.sample_rate, request["audio_format"], path)
                    except AudioError as exc:
                        raise PipelineError(str(exc), retryable=True) from None
                    files.append(path)
                finished.append((files, audio.info))
            conn.send(("done", finished))
        except Canceled:
            conn.send(("canceled",))
        except PipelineError as exc:
            conn.send(("failed", str(exc), exc.retryable, isinstance(exc, OutOfMemory)))
        except MemoryError:
            conn.send(("failed", "out of memory", True, True))
        except Exception as exc:  # the pipeline's own bug: report it as this job's failure
            conn.send(("failed", f"the pipeline failed: {type(exc).__name__}: {exc}", False, _is_oom(exc)))


def _generate(pipeline, requests: list[dict], progress) -> list[GeneratedAudio]:
    """One GPU batch for jobs that can share it (`run_batch`), else one job after another."""
    if len(requests) > 1 and hasattr(pipeline, "run_batch"):
        return pipeline.run_batch(requests, progress)
    return [pipeline.run(request, progress) for request in requests]


def _is_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower()


class PipelineProcess:
    """One child process holding the loaded models; `run` one job at a time."""

    def __init__(self, spec: str, *, checkpoint_dir: Path | None = None, setup_timeout: float = 1800.0):
        self._spec = spec
        self._checkpoint_dir = str(checkpoint_dir) if checkpoint_dir else None
        self._setup_timeout = setup_timeout
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self.models: tuple[str, ...] = ()
        self._cancel = self._ctx.Event()

    def ensure_started(self) -> None:
        if self._proc is None or not self._proc.is_alive():
            self.start()

    def start(self) -> None:
        """Start the child and wait until its models are loaded; raises PipelineError (SETUP_FAILED)."""
        parent, child = self._ctx.Pipe()
        self._cancel = self._ctx.Event()
        self._proc = self._ctx.Process(target=_child_main, args=(self._spec, self._checkpoint_dir, child, self._cancel), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        message = self._receive(time.monotonic() + self._setup_timeout)
        if message[0] != "ready":
            self.stop()
            raise PipelineError(f"pipeline setup failed: {message[1]}")
        self.models = tuple(message[1])  # what the pipeline says it loaded (DiT and LM names), if it says

    def _receive(self, deadline: float) -> tuple:
        while True:
            if self._conn.poll(0.1):
                try:
                    return self._conn.recv()
                except EOFError:
                    pass
            if not self._proc.is_alive():
                self._proc.join()
                raise PipelineCrashed(
                    f"the pipeline process died (exit code {self._proc.exitcode})", retryable=True
                )
            if time.monotonic() > deadline:
                self._kill()
                raise PipelineTimeout("the pipeline ran past its deadline and was stopped")

    def run(
        self,
        requests: list[dict],
        *,
        deadline: float,
        on_progress: Callable[[str, float], None],
        out_dir: Path,
    ) -> list[Finished]:
        """Run jobs that share one batch; one Finished per request, in order.
        Raises Canceled, PipelineError (incl. crash and timeout); restarts the child after a death."""
        self.ensure_started()
        self._cancel.clear()
        self._conn.send(("run", requests, str(out_dir)))
        try:
            while True:
                message = self._receive(deadline)
                kind = message[0]
                if kind == "progress":
                    on_progress(message[1], message[2])
                elif kind == "done":
                    return [Finished(files=[Path(p) for p in files], info=info) for files, info in message[1]]
                elif kind == "canceled":
                    raise Canceled()
                elif kind == "failed":
                    error = OutOfMemory if message[3] else PipelineError
                    raise error(message[1], retryable=message[2])
        except (PipelineCrashed, PipelineTimeout):
            self._proc = None
            raise

    def cancel(self) -> None:
        """Ask the running job to stop at its next stage boundary."""
        self._cancel.set()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
        self._kill()
        self._proc = None
