"""Constrained decoding for the 5 Hz LM, independent of how the model is run.

Phase 1 writes the metadata block field by field in the fixed order bpm, caption, duration,
genres, keyscale, language, timesignature (skipped fields left out). Field names and user-given
values are forced; bpm (30-300), duration (10 to the tier maximum), keyscale, language and
timesignature are chosen among their valid values (token by token, over the byte strings of the
tokens, so multi-byte characters such as ♭ split across tokens still match); caption (and genres,
when not skipped) is free text with audio-code and markup tokens blocked, ending when after a
newline the most likely token does not continue the line with a space. Phase 1 ends with the
end-of-text token where the reference would start `</think>`.

Phase 2 allows only `<|audio_code_N|>` tokens until exactly n codes are written, then only the
end-of-text token.

The LM's own tasks (format, create sample, understand: generation phase "understand") write the
same metadata block, with `</think>` forced after it, then free text (any plain token, no audio
codes or other special tokens) until the model picks the end-of-text token.

`Vocabulary` indexes a tokenizer once: each token's bytes, the audio-code ids, the end token."""

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.contract import BPM_MAX, BPM_MIN, DURATION_MIN, KEY_SCALES, LANGUAGES, TIME_SIGNATURE_BEATS

FIELD_ORDER = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")
# The values the LM may write are the contract's domain rules.
BPM_RANGE = (BPM_MIN, BPM_MAX)
MIN_DURATION = DURATION_MIN
VALID_KEYSCALES = KEY_SCALES
VALID_LANGUAGES = LANGUAGES
VALID_TIME_SIGNATURES = TIME_SIGNATURE_BEATS
AUDIO_CODES = 64000
END_TOKEN = "<|im_end|>"


class Vocabulary:
    """A tokenizer's tokens as bytes, indexed by first byte, plus the audio-code and end ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's printable bytes
        added = {i for i in tokenizer.added_tokens_decoder}
        size = len(tokenizer)
        self.token_bytes: list[bytes] = []
        for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
            piece = piece or ""
            if token_id in added or not all(c in decoder for c in piece):
                self.token_bytes.append(b"" if token_id in added else tokenizer.decode([token_id]).encode())
            else:
                self.token_bytes.append(bytes(decoder[c] for c in piece))
        self.by_first_byte: dict[int, list[int]] = defaultdict(list)
        for token_id, data in enumerate(self.token_bytes):
            if data:
                self.by_first_byte[data[0]].append(token_id)
        code_ids = tokenizer.convert_tokens_to_ids([f"<|audio_code_{i}|>" for i in range(AUDIO_CODES)])
        if any(i is None or i == tokenizer.unk_token_id or not self.token_bytes[i] == b"" for i in code_ids):
            raise ValueError(f"the LM tokenizer lacks the {AUDIO_CODES} <|audio_code_N|> tokens")
        self.code_ids = torch.tensor(code_ids)
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.newline_ids = [i for i, data in enumerate(self.token_bytes) if data == b"\n"]
        free = torch.ones(size, dtype=torch.bool)
        free[sorted(added)] = False
        for token_id, data in enumerate(self.token_bytes):
            if b"`" in data or (b"\n" in data and data != b"\n") or not data:
                free[token_id] = False
        self.free_text = free.nonzero().flatten()  # caption/genres tokens: no markup, no special tokens, newline only alone
        free_form = torch.tensor([bool(data) for data in self.token_bytes], dtype=torch.bool)
        free_form[self.end_id] = True
        self.free_form = free_form.nonzero().flatten()  # the text after </think> (lyrics): any plain token, or the end
        self.continues_line = {i for i, data in enumerate(self.token_bytes) if data[:1] in (b" ", b"\t")}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


@functools.cache
def load_vocabulary(path: str) -> Vocabulary:
    """An LM checkpoint folder's tokenizer, indexed once per process: the pt backend, a vllm engine and
    its logits processor all use the one for their folder."""
    from transformers import AutoTokenizer

    return Vocabulary(AutoTokenizer.from_pretrained(path, local_files_only=True))


@dataclass
class Choice:
    """Choosing one of `values` written as ' <value>\\n', token by token."""

    vocabulary: Vocabulary
    values: tuple[str, ...]

    def __post_init__(self):
        self.targets = {f" {v}\n".encode() for v in self.values}
        self.prefixes = {t[:i] for t in self.targets for i in range(len(t) + 1)}
        self.written = b""

    def allowed(self) -> list[int]:
        nexts = {t[len(self.written)] for t in self.targets if t.startswith(self.written) and len(t) > len(self.written)}
        out = []
        for first in nexts:
            for token_id in self.vocabulary.by_first_byte.get(first, ()):
                if self.written + self.vocabulary.token_bytes[token_id] in self.prefixes:
                    out.append(token_id)
        return out

    def take(self, token_id: int) -> bool:
        """Record a token; True once a whole value and its newline are written."""
        self.written += self.vocabulary.token_bytes[token_id]
        return self.written in self.targets

    @property
    def value(self) -> str:
        return self.written.decode().strip()


def field_values(field: str, max_duration: int) -> tuple[str, ...] | None:
    """The valid values of a constrained field; None for free-text fields."""
    if field == "bpm":
        return tuple(str(v) for v in range(BPM_RANGE[0], BPM_RANGE[1] + 1))
    if field == "duration":
        return tuple(str(v) for v in range(MIN_DURATION, max(max_duration, MIN_DURATION) + 1))
    if field == "keyscale":
        return VALID_KEYSCALES
    if field == "language":
        return VALID_LANGUAGES
    if field == "timesignature":
        return VALID_TIME_SIGNATURES
    return None


def user_value_text(field: str, value) -> str:
    """How a user-given value is written into the block (not range-checked, as in the reference)."""
    return f"{field}: {value}\n"
