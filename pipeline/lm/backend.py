"""What the planner and the LM tasks ask of an LM backend, and the protocol every backend (pt,
vllm, the stub of the prompt-conformance runner) implements. Backends return the decoded text with special tokens
kept (`<|audio_code_N|>`, `<|im_end|>`); the planner parses it.

Every call takes an optional `report(done, total)`: the backend calls it every `TOKEN_CHUNK` tokens
(sooner once `REPORT_SECONDS` have passed, so a slow device reports as often) with the tokens
decided so far and the most the call will write. Whatever `report` raises (the worker's `Canceled`)
ends the call and propagates, so an LM call stops within one chunk."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

TOKEN_CHUNK = 16  # tokens between two reports (tenths of a second on a GPU)...
REPORT_SECONDS = 0.25  # ...or fewer tokens, once this long has passed since the last report
TokenReport = Callable[[int, int], None]


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


def most_tokens(request: MetadataRequest | CodesRequest | TextRequest) -> int:
    """The most tokens `request` writes: exactly its codes and the end token for codes, else its budget."""
    if isinstance(request, CodesRequest):
        return min(request.n_codes + 1, request.max_new_tokens)
    return request.max_new_tokens


class TokenProgress:
    """Calls `report(done, total)` once `done` has grown by `TOKEN_CHUNK` tokens since the last call,
    or by any once `REPORT_SECONDS` have passed (both read when it is made; `clock` for tests)."""

    def __init__(self, report: TokenReport | None, total: int, clock: Callable[[], float] = time.monotonic):
        self.report, self.total, self.clock = report, max(total, 1), clock
        self.chunk, self.seconds = TOKEN_CHUNK, REPORT_SECONDS
        self._done, self._at = 0, clock()

    def update(self, done: int) -> None:
        if self.report is None or done <= self._done:
            return
        now = self.clock()
        if done - self._done >= self.chunk or now - self._at >= self.seconds:
            self._done, self._at = done, now
            self.report(min(done, self.total), self.total)


class LMBackend(Protocol):
    name: str  # the LM checkpoint folder, e.g. "acestep-5Hz-lm-1.7B"
    backend: str  # what runs it: "pt" or "vllm" (reported in the job result as lm_backend)

    def generate_metadata(self, request: MetadataRequest, report: TokenReport | None = None) -> str: ...

    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]: ...

    def generate_text(self, request: TextRequest, report: TokenReport | None = None) -> str: ...
