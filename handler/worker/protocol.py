"""What the worker and its pipeline child say to each other, as types (after cog's event types):
the parent sends `RunJobs`, `RunLmTask` or `Stop`; the child answers `Ready` or `SetupFailed` once,
then per run any number of `Progress` and one of `Done` (`LmTaskDone` for an LM task), `RunCanceled`
or `RunFailed`. `ProcessState` is where a
child stands, as the parent sees it."""

import enum
from dataclasses import dataclass, field
from typing import Any

from pipeline.contract import GenerationRequest


class ProcessState(enum.StrEnum):
    NEW = "new"  # not started (or stopped, or died: started again before the next run)
    STARTING = "starting"  # loading its models
    READY = "ready"
    BUSY = "busy"  # running a job
    DEFUNCT = "defunct"  # setup failed, died or killed at a deadline


# ---- parent -> child --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJobs:
    """Run these requests (jobs sharing one GPU batch when more than one); write the files to out_dir."""

    requests: list[GenerationRequest]
    out_dir: str


@dataclass(frozen=True)
class RunLmTask:
    """Run one of the LM's own tasks (format, create_sample, understand) with these params."""

    task: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Stop:
    pass


# ---- child -> parent --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    models: list[str]  # what the pipeline loaded (DiT and LM names), if it says


@dataclass(frozen=True)
class SetupFailed:
    error: str


@dataclass(frozen=True)
class Progress:
    stage: str
    fraction: float
    facts: dict[str, Any] = field(default_factory=dict)  # what the run learned, e.g. audio_seconds


@dataclass(frozen=True)
class JobFiles:
    """One request's encoded audio files and result metadata; or, in a batch, why that one job failed
    (`error`, and whether another attempt may do better) while the others went on."""

    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False


@dataclass(frozen=True)
class Done:
    results: list[JobFiles]  # one per request, in order


@dataclass(frozen=True)
class LmTaskDone:
    result: dict[str, Any]  # JSON-able: what the task produced


@dataclass(frozen=True)
class RunCanceled:
    pass


@dataclass(frozen=True)
class RunFailed:
    error: str
    retryable: bool
    out_of_memory: bool = False
