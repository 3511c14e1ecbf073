"""The pipeline in a supervised child process. Models load once in the child; each job is a request
message; the child reports progress, and writes the encoded audio files itself (no large arrays
cross the pipe). If the child dies (segfault, CUDA abort, OOM kill) or hangs past the deadline, the
parent turns that into a job error naming what happened and starts a fresh child for the next job.

The pipeline is loaded from a factory `module:callable` (ACESTEP_PIPELINE), called with the
checkpoint directory (ACESTEP_CHECKPOINT_DIR, or None) and the PipelineOptions (from Settings),
returning an object with
`run(request: GenerationRequest, progress) -> GeneratedAudio` and optionally
`run_batch(requests: list[GenerationRequest], progress) -> list[GeneratedAudio]` for jobs that share one GPU
batch. `progress(stage, fraction, **facts)` is forwarded to the parent's `on_progress` (facts such as
`audio_seconds`); it raises `Canceled` once the run should stop, so a cancel takes effect at the
pipeline's next report (a DiT step, an LM token chunk, a VAE decoder block).
"""

import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handler.worker import protocol as msg
from handler.worker.protocol import ProcessState
from pipeline.audio_io import AudioError, encode_audio
from pipeline.contract import GenerationRequest, PipelineOptions, stage_progress
from pipeline.interface import Canceled, GeneratedAudio, OutOfMemory, PipelineError

__all__ = ["Canceled", "Finished", "OutOfMemory", "PipelineError", "PipelineProcess", "ProcessState"]


class PipelineCrashed(PipelineError):
    """The pipeline process died."""


class PipelineTimeout(PipelineError):
    """The pipeline ran past the job's deadline and was stopped."""


@dataclass
class Finished:
    files: list[Path]
    info: dict[str, Any]
    error: str | None = None  # this job of a batch failed on its own (the others did not)
    retryable: bool = False


def load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"ACESTEP_PIPELINE must be module:callable, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


PARENT_CHECK_SECONDS = 0.5


def _exit_with_parent(parent: int) -> None:
    """Ends this child once its worker is gone, even killed with SIGKILL mid-load: no orphan keeps
    holding GPU memory. (A thread watching the parent pid: the kernel's parent-death signal would
    fire when the worker's thread that started the child ends, and workers start children on one.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _child_main(spec: str, checkpoint_dir: str | None, options: PipelineOptions, conn, cancel_flag,
                parent: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    from handler.logs import configure_child_logging  # a fresh (spawned) interpreter: the CLI's set-up is not here
    configure_child_logging()
    try:
        pipeline = load_factory(spec)(Path(checkpoint_dir) if checkpoint_dir else None, options)
    except Exception as exc:  # any failure to load is reported as SETUP_FAILED, not a crash
        conn.send(msg.SetupFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(msg.Ready([str(m) for m in getattr(pipeline, "models", ())]))
    while True:
        message = conn.recv()
        if isinstance(message, msg.Stop):
            return

        def progress(stage: str, fraction: float, **facts: Any) -> None:
            if cancel_flag.is_set():
                raise Canceled()
            conn.send(msg.Progress(stage, float(fraction), facts))

        conn.send(answer(pipeline, message, progress))


def answer(pipeline, message, progress):
    """The child's answer to one run message."""
    if isinstance(message, msg.RunLmTask):
        return run_lm_task(pipeline, message, progress)
    return run_jobs(pipeline, message, progress)


def run_lm_task(pipeline, message: msg.RunLmTask, progress) -> msg.LmTaskDone | msg.RunCanceled | msg.RunFailed:
    """One LM task on a loaded pipeline (one without `run_lm_task` has no LM tasks)."""
    if not hasattr(pipeline, "run_lm_task"):
        return msg.RunFailed(f"this worker's pipeline cannot run the LM task {message.task!r}", False)
    return _answered(lambda: msg.LmTaskDone(dict(pipeline.run_lm_task(message.task, dict(message.params), progress))),
                     "the LM task failed")


def run_jobs(pipeline, message: msg.RunJobs, progress) -> msg.Done | msg.RunCanceled | msg.RunFailed:
    """Run one RunJobs message on a loaded pipeline and encode its audio: the child's answer."""

    def generate() -> msg.Done:
        generated = _generate(pipeline, message.requests, progress)
        progress("encoding", stage_progress("encoding", 0.0))
        return msg.Done([
            _job_files(audio, request, Path(message.out_dir) / str(index))
            for index, (request, audio) in enumerate(zip(message.requests, generated, strict=True))
        ])

    return _answered(generate, "the pipeline failed")


def _job_files(audio, request: GenerationRequest, prefix: Path) -> msg.JobFiles:
    """One job's answer: its files, or (a batch's job that failed on its own) its error."""
    if isinstance(audio, PipelineError):
        return msg.JobFiles([], {}, str(audio), audio.retryable)
    try:
        return msg.JobFiles(_encode(audio, request, prefix), audio.info)
    except PipelineError as exc:
        return msg.JobFiles([], {}, str(exc), exc.retryable)


def _answered(run, failed: str):
    """`run()`'s answer, or the message its exception stands for; any other exception is the
    pipeline's own bug, reported as this run's failure (`failed`: how the message starts)."""
    try:
        return run()
    except Canceled:
        return msg.RunCanceled()
    except PipelineError as exc:
        return msg.RunFailed(str(exc), exc.retryable, isinstance(exc, OutOfMemory))
    except MemoryError:
        return msg.RunFailed("out of memory", True, True)
    except Exception as exc:
        return msg.RunFailed(f"{failed}: {type(exc).__name__}: {exc}", False, _is_oom(exc))


def _encode(audio: GeneratedAudio, request: GenerationRequest, prefix: Path) -> list[str]:
    """Each item as a file in the request's format; output that must not be written (non-finite,
    silent) fails the job, retryably (another seed may do)."""
    files = []
    for i, samples in enumerate(audio.audios):
        path = Path(f"{prefix}-output-{i}.{request.audio_format}")
        try:
            encode_audio(np.asarray(samples), audio.sample_rate, request.audio_format, path)
        except AudioError as exc:
            raise PipelineError(f"item {i}: {exc}", retryable=True) from None
        files.append(str(path))
    return files


def finished(answer) -> "list[Finished] | dict":
    """A run's answer as the parent returns it: the Finished files (an LM task: its result), or the
    raise it stands for."""
    if isinstance(answer, msg.Done):
        if len(answer.results) == 1 and answer.results[0].error is not None:  # a job alone: its failure
            raise PipelineError(answer.results[0].error, retryable=answer.results[0].retryable)
        return [Finished(files=[Path(p) for p in r.files], info=r.info, error=r.error, retryable=r.retryable)
                for r in answer.results]
    if isinstance(answer, msg.LmTaskDone):
        return answer.result
    if isinstance(answer, msg.RunCanceled):
        raise Canceled()
    if isinstance(answer, msg.RunFailed):
        raise (OutOfMemory if answer.out_of_memory else PipelineError)(answer.error, retryable=answer.retryable)
    raise PipelineError(f"unexpected message from the pipeline process: {answer!r}", retryable=True)


def _generate(pipeline, requests: list[GenerationRequest], progress) -> list:
    """One GPU batch for jobs that can share it (`run_batch`: a GeneratedAudio per job, or the
    PipelineError of a job that failed on its own), else one job after another."""
    if len(requests) > 1 and hasattr(pipeline, "run_batch"):
        return pipeline.run_batch(requests, progress)
    return [pipeline.run(request, progress) for request in requests]


def _is_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower()


class PipelineProcess:
    """One child process holding the loaded models; `run` one job at a time."""

    def __init__(self, spec: str, *, checkpoint_dir: Path | None = None, options: PipelineOptions = PipelineOptions(),
                 setup_timeout: float = 1800.0):
        self._spec = spec
        self._checkpoint_dir = str(checkpoint_dir) if checkpoint_dir else None
        self._options = options
        self._setup_timeout = setup_timeout
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self.state = ProcessState.NEW
        self.models: tuple[str, ...] = ()
        self._cancel = self._ctx.Event()
        self._shapes: set[tuple] = set()  # the kinds of work this child has run (see `first_run_of`)

    def ensure_started(self) -> None:
        if self._proc is None or not self._proc.is_alive():
            self.start()

    def start(self) -> None:
        """Start the child and wait until its models are loaded; raises PipelineError (SETUP_FAILED)."""
        parent, child = self._ctx.Pipe()
        self._cancel = self._ctx.Event()
        self._proc = self._ctx.Process(
            target=_child_main, args=(self._spec, self._checkpoint_dir, self._options, child, self._cancel, os.getpid()),
            daemon=True
        )
        self.state = ProcessState.STARTING
        self._shapes = set()
        self._proc.start()
        child.close()
        self._conn = parent
        message = self._receive(time.monotonic() + self._setup_timeout)
        if not isinstance(message, msg.Ready):
            self.stop()
            self.state = ProcessState.DEFUNCT
            raise PipelineError(f"pipeline setup failed: {getattr(message, 'error', message)}")
        self.state = ProcessState.READY
        self.models = tuple(message.models)

    def _receive(self, deadline: float):
        while True:
            if self._conn.poll(0.1):
                try:
                    return self._conn.recv()
                except EOFError:
                    pass
            if not self._proc.is_alive():
                self._proc.join()
                self.state = ProcessState.DEFUNCT
                raise PipelineCrashed(
                    f"the pipeline process died (exit code {self._proc.exitcode})", retryable=True
                )
            if time.monotonic() > deadline:
                self._kill()
                self.state = ProcessState.DEFUNCT
                raise PipelineTimeout("the pipeline ran past its deadline and was stopped")

    def run(
        self,
        requests: list[GenerationRequest],
        *,
        deadline: float,
        on_progress: Callable[..., None],
        out_dir: Path,
    ) -> list[Finished]:
        """Run jobs that share one batch; one Finished per request, in order.
        Raises Canceled, PipelineError (incl. crash and timeout); restarts the child after a death."""
        return self._run(msg.RunJobs(list(requests), str(out_dir)), deadline, on_progress)

    def run_lm_task(self, task: str, params: dict, *, deadline: float, on_progress: Callable[..., None]) -> dict:
        """Run one LM task; its result. Raises as `run` does."""
        return self._run(msg.RunLmTask(task, dict(params)), deadline, on_progress)

    def _run(self, message, deadline: float, on_progress: Callable[..., None]):
        self.ensure_started()
        self._cancel.clear()
        self._conn.send(message)
        self.state = ProcessState.BUSY
        try:
            while True:
                message = self._receive(deadline)
                if isinstance(message, msg.Progress):
                    on_progress(message.stage, message.fraction, **message.facts)
                    continue
                self.state = ProcessState.READY
                return finished(message)
        except (PipelineCrashed, PipelineTimeout):
            self._proc = None
            raise

    def first_run_of(self, shape: tuple) -> bool:
        """Whether work of this `shape` (task, seconds, songs) is new to the running child, which is
        remembered from now on. A first run may pay for warming up (lazy set-up, kernels and buffers
        made for new tensor shapes: on a CPU a song of a new length decoded up to 2-4x slower the first
        time); the job's timings say so (`cold`), for reading its stage times."""
        new = shape not in self._shapes
        self._shapes.add(shape)
        return new

    def cancel(self) -> None:
        """Ask the running job to stop at the pipeline's next progress report."""
        self._cancel.set()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(msg.Stop())
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
        self._kill()
        self._proc = None
        self.state = ProcessState.NEW
