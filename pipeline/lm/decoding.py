"""The token decisions of the 5 Hz LM, shared by every backend.

A request becomes a *program* (a Python generator over `constrained`'s rules) that yields what it
needs at each position: `Force(ids)` (tokens written whatever the model says: field names, user
values, the end), `Pick(allowed)` (a token sampled from the model's guided logits, restricted to
`allowed`) or `PEEK` (the logits at the next position, looked at without deciding: free text ends
after a newline when the most likely next token does not continue the line).

`Decoder` runs a program one position at a time: `decide(logits)` returns the token at the next
position given the (CFG-guided) logits there, and `forced_run()` hands over a run of forced tokens
that needs no logits at all. The pt backend feeds forced runs in one forward; the vllm backend
forces them one step at a time from its logits processor. Both get the same tokens from the same
logits and seed: the sampling order of the reference is CFG, constraint mask, repetition penalty,
top-k, top-p, temperature."""

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.lm.backend import CodesRequest, MetadataRequest, Sampling, TextRequest
from pipeline.lm.constrained import FIELD_ORDER, Choice, Vocabulary, field_values, user_value_text

MAX_CAPTION_TOKENS = 512  # a free-text field is closed with a newline after this many tokens


@dataclass(frozen=True)
class Force:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Pick:
    allowed: Any  # token ids (a list or tensor) or a bool mask over the vocabulary


class _Peek:
    pass


PEEK = _Peek()
Program = Generator[Force | Pick | _Peek, Any, None]


def guided(logits: torch.Tensor, items: int, cfg_scale: float) -> torch.Tensor:
    """[2 x items, V] -> [items, V]: uncond + scale (cond - uncond); [items, V] as is without CFG."""
    if logits.shape[0] == items:
        return logits
    cond, uncond = logits[:items], logits[items:]
    return uncond + cfg_scale * (cond - uncond)


_device_copies: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _on_device(allowed, device: torch.device) -> torch.Tensor:
    """`allowed` on the logits' device; the vocabulary's long-lived id tensors (the 64 000 audio codes,
    the free-text ids) are copied there once, not at every step."""
    if not isinstance(allowed, torch.Tensor):
        return torch.as_tensor(allowed, device=device)
    if allowed.device == device:
        return allowed
    key = (id(allowed), device)
    if key not in _device_copies:
        _device_copies[key] = (allowed, allowed.to(device))  # holding the original keeps its id unique
    return _device_copies[key][1]


def sample_token(logits: torch.Tensor, allowed, sampling: Sampling, history: list[int],
                 generator: torch.Generator | None) -> int:
    """One token from `logits` [V] (float32), restricted to `allowed` (a bool mask or ids)."""
    logits = logits.float().clone()
    if allowed is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[_on_device(allowed, logits.device)] = 0.0
        logits = logits + mask
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / sampling.repetition_penalty, values * sampling.repetition_penalty)
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and 0 < sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative > sampling.top_p
        drop[1:] = drop[:-1].clone()
        drop[0] = False  # the most likely token always stays
        logits[order[drop]] = float("-inf")
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = (logits / sampling.temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def _metadata_block(vocab: Vocabulary, request: MetadataRequest | TextRequest) -> Program:
    """`<think>\\n`, then each field in order: a user value is forced (even for a field whose
    generation is skipped: the tasks skip the language they inject), a skipped field is left out,
    valid values are chosen, caption/genres are free text."""
    yield Force(tuple(vocab.encode("<think>\n")))
    user = request.user_metadata or {}
    skipped = {"caption": request.skip_caption, "language": request.skip_language, "genres": request.skip_genres}
    for name in FIELD_ORDER:
        if user.get(name) is not None:
            yield Force(tuple(vocab.encode(user_value_text(name, user[name]))))
            continue
        if skipped.get(name):
            continue
        yield Force(tuple(vocab.encode(f"{name}:")))
        values = field_values(name, request.max_duration)
        if values is not None:
            choice = Choice(vocab, values)
            while not choice.take((yield Pick(choice.allowed()))):
                pass
        else:
            yield from _free_text(vocab, max_lines=None if name == "caption" else 1)


def metadata_program(vocab: Vocabulary, request: MetadataRequest) -> Program:
    """Phase 1: the metadata block, then the end token where the reference begins `</think>`."""
    yield from _metadata_block(vocab, request)
    yield Force((vocab.end_id,))


def text_program(vocab: Vocabulary, request: TextRequest) -> Program:
    """The LM's tasks: the metadata block closed by `</think>`, then free text (lyrics) until the
    model picks the end token (or, with `stop_at_reasoning`, the end token right away)."""
    if request.generation_phase != "understand":
        raise ValueError(f"a TextRequest runs the 'understand' phase, not {request.generation_phase!r}")
    yield from _metadata_block(vocab, request)
    yield Force(tuple(vocab.encode("</think>")))
    if request.stop_at_reasoning:
        yield Force((vocab.end_id,))
        return
    while (yield Pick(vocab.free_form)) != vocab.end_id:
        pass


def _free_text(vocab: Vocabulary, max_lines: int | None) -> Program:
    """Free text after `field:` up to a newline that the model does not continue with a space."""
    lines, count = 0, 0
    while True:
        if count >= MAX_CAPTION_TOKENS:
            yield Pick(vocab.newline_ids)
            return
        token = yield Pick(vocab.free_text)
        count += 1
        if vocab.token_bytes[token] != b"\n":
            continue
        lines += 1
        best = int((yield PEEK).argmax())
        if (max_lines is not None and lines >= max_lines) or best not in vocab.continues_line:
            return


def codes_program(vocab: Vocabulary, request: CodesRequest) -> Program:
    """Phase 2: exactly `n_codes` audio-code tokens, then the end token."""
    for _ in range(request.n_codes):
        yield Pick(vocab.code_ids)
    yield Force((vocab.end_id,))


class Decoder:
    """One sequence's decisions: the program, its sampling settings, its seeded generator and the
    tokens written so far (which the repetition penalty looks at)."""

    def __init__(self, program: Program, sampling: Sampling, seed: int | None, max_new_tokens: int):
        self.program = program
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self._queue: deque[int] = deque()
        self._step: Force | Pick | _Peek | None = None
        self._advance(None)

    @classmethod
    def for_request(cls, vocab: Vocabulary, request: MetadataRequest | CodesRequest | TextRequest) -> "Decoder":
        if isinstance(request, MetadataRequest):
            program = metadata_program(vocab, request)
        elif isinstance(request, TextRequest):
            program = text_program(vocab, request)
        else:
            program = codes_program(vocab, request)
        return cls(program, request.sampling, request.seed, request.max_new_tokens)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens or (self._step is None and not self._queue)

    def _advance(self, value) -> None:
        try:
            self._step = self.program.send(value)
        except StopIteration:
            self._step = None

    def _record(self, token: int) -> int:
        self.tokens.append(token)
        return token

    def _unfold_forced(self) -> None:
        while not self._queue and isinstance(self._step, Force):
            self._queue.extend(self._step.ids)
            self._advance(None)

    @property
    def wants_logits(self) -> bool:
        """False when the next token is forced (decide() then ignores its argument)."""
        self._unfold_forced()
        return not self._queue

    def forced_run(self) -> list[int]:
        """The forced tokens at the next positions (none when the next one needs the model)."""
        self._unfold_forced()
        room = self.max_new_tokens - len(self.tokens)
        run = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
        self.tokens.extend(run)
        return run

    def decide(self, logits: torch.Tensor | None) -> int:
        """The token at the next position, given the guided logits [V] there."""
        if self.done:
            raise RuntimeError("the decoder has already finished")
        while isinstance(self._step, _Peek):
            self._advance(logits)
        self._unfold_forced()
        if self._queue:
            return self._record(self._queue.popleft())
        step = self._step
        if not isinstance(step, Pick):
            raise RuntimeError("the program ended without its end token")
        token = sample_token(logits, step.allowed, self.sampling, self.tokens, self.generator)
        self._record(token)
        self._advance(token)
        return token
