"""A pipeline "process" that runs in the test's own process: the same methods as PipelineProcess
and the same child logic (`run_jobs`: generate, encode, answer), without spawning. For in-process
tests of JobRun and Worker over the real store (after cog's test_worker.py)."""

import threading
import time
from pathlib import Path

from handler.worker import protocol as msg
from handler.worker.pipeline_process import (PipelineError, PipelineProcess, PipelineTimeout, answer, finished,
                                             load_factory)
from handler.worker.protocol import ProcessState
from pipeline.contract import PipelineOptions
from pipeline.interface import Canceled


class InProcessPipeline:
    def __init__(self, factory: str = "tests.fakes.pipelines:ok", options: PipelineOptions = PipelineOptions(),
                 checkpoint_dir: Path | None = None):
        self._factory, self._options, self._checkpoint_dir = factory, options, checkpoint_dir
        self.pipeline = None
        self.models: tuple[str, ...] = ()
        self.state = ProcessState.NEW
        self.received: list = []  # every run message (RunJobs, RunLmTask), as the child would get it
        self.starts = 0
        self._cancel = threading.Event()
        self._shapes: set[tuple] = set()

    first_run_of = PipelineProcess.first_run_of  # the kinds of work run since the pipeline was made

    def ensure_started(self) -> None:
        if self.pipeline is None:
            self.starts += 1
            self._shapes = set()
            try:
                self.pipeline = load_factory(self._factory)(self._checkpoint_dir, self._options)
            except Exception as exc:
                self.state = ProcessState.DEFUNCT
                raise PipelineError(f"pipeline setup failed: {type(exc).__name__}: {exc}") from None
            self.models = tuple(getattr(self.pipeline, "models", ()))
            self.state = ProcessState.READY

    def run(self, requests, *, deadline: float, on_progress, out_dir: Path):
        return self._run(msg.RunJobs(list(requests), str(out_dir)), deadline, on_progress)

    def run_lm_task(self, task: str, params: dict, *, deadline: float, on_progress):
        return self._run(msg.RunLmTask(task, dict(params)), deadline, on_progress)

    def _run(self, message, deadline: float, on_progress):
        self.ensure_started()
        self._cancel.clear()
        self.received.append(message)

        def progress(stage: str, fraction: float, **facts) -> None:
            if self._cancel.is_set():
                raise Canceled()
            if time.monotonic() > deadline:
                raise PipelineTimeout("the pipeline ran past its deadline and was stopped")
            on_progress(stage, fraction, **facts)

        self.state = ProcessState.BUSY
        try:
            return finished(answer(self.pipeline, message, progress))
        finally:
            self.state = ProcessState.READY

    def cancel(self) -> None:
        self._cancel.set()

    def stop(self) -> None:
        self.pipeline, self.state = None, ProcessState.NEW
