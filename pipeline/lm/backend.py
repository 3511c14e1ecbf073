"""What the planner and the LM tasks ask of an LM backend, and the protocol every backend (pt,
vllm, the stub of the prompt-conformance runner) implements. Backends return the decoded text with special tokens
kept (`<|audio_code_N|>`, `<|im_end|>`); the planner parses it."""

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.85  # <= 0: greedy
    top_k: int | None = None  # None or 0: off
    top_p: float | None = 0.9  # None or >= 1: off
    repetition_penalty: float = 1.0  # 1: off


@dataclass(frozen=True)
class MetadataRequest:
    """Phase 1: the chain-of-thought metadata block, generated until `</think>` (the FSM forces the
    field order and valid values; `user_metadata` values are written in, never generated)."""

    prompt: str
    unconditional_prompt: str
    cfg_scale: float  # 1.0: no unconditional pass (the reference since 2026-04)
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    user_metadata: dict[str, Any] | None = None  # bpm, keyscale, timesignature, duration as given by the user
    skip_caption: bool = False
    skip_language: bool = False
    skip_genres: bool = True
    target_duration: float | None = None
    max_duration: int = 600
    seed: int | None = None


@dataclass(frozen=True)
class CodesRequest:
    """Phase 2, one per batch item: exactly `n_codes` `<|audio_code_N|>` tokens, then end of text."""

    prompt: str
    unconditional_prompt: str
    cfg_scale: float
    n_codes: int
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None


@dataclass(frozen=True)
class TextRequest:
    """The LM's own tasks (format, create sample, understand): one prompt, no CFG. With
    `generation_phase` "understand" the FSM writes the metadata block (`user_metadata` values
    forced, skipped fields left out, genres generated unless skipped), closes it with `</think>` and
    then lets the model write free text (lyrics) until the end token; `stop_at_reasoning` ends the
    output at `</think>` instead."""

    prompt: str
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    user_metadata: dict[str, Any] | None = None  # bpm, duration, keyscale, timesignature, language
    skip_caption: bool = False
    skip_language: bool = False
    skip_genres: bool = False
    generation_phase: str = "understand"
    stop_at_reasoning: bool = False
    target_duration: float | None = None
    max_duration: int = 600
    seed: int | None = None


class LMBackend(Protocol):
    name: str  # the LM checkpoint folder, e.g. "acestep-5Hz-lm-1.7B"
    backend: str  # what runs it: "pt" or "vllm" (reported in the job result as lm_backend)

    def generate_metadata(self, request: MetadataRequest) -> str: ...

    def generate_codes(self, requests: list[CodesRequest]) -> list[str]: ...

    def generate_text(self, request: TextRequest) -> str: ...
