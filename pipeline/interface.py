"""What the worker and a pipeline exchange, kept on the pipeline's side so the pipeline needs
nothing from the service (no HTTP, no SQL). The request itself is `pipeline.contract.GenerationRequest`.

A pipeline object has `run(request: GenerationRequest, progress) -> GeneratedAudio` and optionally
`run_batch(requests: list[GenerationRequest], progress) -> list[GeneratedAudio | PipelineError]` (one GPU
pass for jobs that can share it; a job that fails on its own gets its PipelineError in its place). `progress(stage,
fraction, **facts)` reports where it stands (`pipeline.contract.stage_progress`; facts such as
`audio_seconds`, the seconds per song once known) and raises `Canceled` when the job should stop, so
cancellation takes effect at the next report (a DiT step, an LM token chunk, a VAE decoder block).
Failures are `PipelineError`s; `retryable=False` for faults of the input.
A pipeline returns raw audio; the worker's child encodes it (`pipeline.audio_io.encode_audio`: the one
place that refuses non-finite or silent output and scales down what would clip)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.contract import SAMPLE_RATE

Progress = Callable[..., None]  # progress(stage, fraction, **facts)


class Canceled(Exception):
    """The client canceled the job."""


class PipelineError(Exception):
    """The pipeline failed on this job. `retryable` is False for faults of the input."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class OutOfMemory(PipelineError):
    """The device ran out of memory (the worker may retry with a smaller batch)."""


@dataclass
class GeneratedAudio:
    """What a pipeline returns: float32 arrays shaped (channels, samples) at `sample_rate`, and metadata
    for the result (seed_value, generation_info, and bpm/duration/... when the LM filled them)."""

    audios: list[Any]  # numpy arrays (channels, samples)
    sample_rate: int = SAMPLE_RATE
    info: dict[str, Any] = field(default_factory=dict)
