"""What the worker and a pipeline exchange, kept on the pipeline's side so the pipeline needs
nothing from the service (no HTTP, no SQL).

A pipeline object has `run(request: dict, progress) -> GeneratedAudio` and optionally
`run_batch(requests: list[dict], progress) -> list[GeneratedAudio]`. `progress(stage, fraction)`
reports where it stands and raises `Canceled` when the job should stop, so cancellation takes
effect between stages. Failures are `PipelineError`s; `retryable=False` for faults of the input."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.audio_io import SAMPLE_RATE


class Canceled(Exception):
    """The client canceled the job."""


class PipelineError(Exception):
    """The pipeline failed on this job. `retryable` is False for faults of the input."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class OutOfMemory(PipelineError):
    """The device ran out of memory (the worker may retry with a smaller batch)."""


# The optional `info` keys a job result carries (what the LM decided, which models made the audio).
RESULT_INFO_FIELDS = ("bpm", "duration", "genres", "keyscale", "timesignature", "metas", "lm_model", "lm_backend", "dit_model")


@dataclass
class GeneratedAudio:
    """What a pipeline returns: float32 arrays shaped (channels, samples) at `sample_rate`, and metadata
    for the result (seed_value, generation_info, and bpm/duration/... when the LM filled them)."""

    audios: list[np.ndarray]
    sample_rate: int = SAMPLE_RATE
    info: dict[str, Any] = field(default_factory=dict)
