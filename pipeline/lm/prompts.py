"""The text the 5 Hz LM reads and writes: chat prompts, the `<think>` metadata block, output parsers,
token budgets.

Every prompt here is byte-exact with the ACE-Step 1.5 reference (6d467e4, 2026-06-26), checked against the
prompt fixtures by `python -m pipeline.prompt_conformance`. Reference quirks kept on purpose, because
the LM was trained on them or because they decide what the DiT gets:

* prompts are the Qwen3 chat template rendered with plain jinja2 (`trim_blocks`, `lstrip_blocks`)
  with the generation prompt; phase 2 (codes) then appends its `<think>` block and two newlines,
  leaving the assistant turn open (since 2026-06: no `<|im_end|>` after the block);
* the phase-2 unconditional (CFG) prompt is the raw negative prompt (or `NO USER INPUT`) as the
  user turn with an empty `<think>\\n\\n</think>` block; `legacy=True` keeps the older
  `# Caption/# Lyric` user turn (the reference's `use_legacy_cfg_prompt` A/B toggle);
* the metadata block is `yaml.dump(..., allow_unicode=True, sort_keys=True)` with PyYAML's quoting
  (`'no'`, `'12.5'`, captions holding `': '`) and width-80 wrapping; `'3/4'` is written `3`;
* the parser keeps YAML quotes in a caption and keeps `'N/A'` and `'12.5'` as strings;
* audio codes are matched with Python's `\\d`, which also takes non-ASCII digits (`'١٢'` -> 12).
"""

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline import contract

CHAT_TEMPLATE_PATH = Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja"

LM_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
UNDERSTAND_INSTRUCTION = "Understand the given musical conditions and describe the audio semantics accordingly:"
INSPIRATION_INSTRUCTION = "Expand the user's input into a more detailed and specific musical description:"
FORMAT_INSTRUCTION = "Format the user's input into a more detailed and specific musical description:"

DEFAULT_NEGATIVE_PROMPT = contract.DEFAULT_LM_NEGATIVE_PROMPT
EMPTY_COT = "<think>\n\n</think>"  # the assistant part of the phase-2 unconditional (CFG) prompt
COT_SUFFIX = "\n\n"  # what follows the metadata block in every phase-2 prompt

# The fields of the metadata block, in the order the FSM generates them (genres is never written back).
COT_KEYS = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")
USER_METADATA_KEYS = ("bpm", "keyscale", "timesignature", "duration")
_INT_FIELDS = ("bpm", "duration")
_PLAIN_FIELDS = ("genres", "keyscale", "language", "timesignature")

MAX_AUDIO_CODE = 63999
CODES_PER_SECOND = 5
DURATION_MIN, DURATION_MAX = contract.DURATION_MIN, contract.DURATION_MAX
MAX_MODEL_LEN = 4096  # 2048 when the vLLM backend runs in low-GPU-memory mode
_MODEL_LEN_RESERVE = 64
_CODES_TOKEN_MARGIN = 10  # the FSM forces EOS right after the last code
_COT_TOKEN_MARGIN = 500

_AUDIO_CODE_TOKEN = re.compile(r"<\|audio_code_\d+\|>")
_AUDIO_CODE_VALUE = re.compile(r"<\|audio_code_(\d+)\|>")
_REASONING = (re.compile(r"<think>(.*?)</think>", re.DOTALL), re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL))

Message = dict[str, str]


# ---- chat template ----------------------------------------------------------------------------


@cache
def _template() -> Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"))


def render_chat(messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The Qwen3 chat template applied to `messages`, as `apply_chat_template(tokenize=False)` does
    (no `enable_thinking`: the reference never passes it)."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def _system(instruction: str) -> Message:
    return {"role": "system", "content": f"# Instruction\n{instruction}\n\n"}


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


def _caption_and_lyrics(caption: str, lyrics: str) -> str:
    return f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n"


def has_meaningful_negative_prompt(negative_prompt: str | None) -> bool:
    """A negative prompt counts when it is not blank and not the `NO USER INPUT` sentinel; only then
    does it replace the caption of the unconditional (CFG) prompts."""
    return bool(negative_prompt and negative_prompt.strip() and negative_prompt.strip() != DEFAULT_NEGATIVE_PROMPT)


# ---- generation prompts (phase 1: metadata, phase 2: codes) ------------------------------------


def phase1_messages(caption: str, lyrics: str) -> list[Message]:
    """Phase 1 (metadata block): the caption and lyrics as the user turn."""
    return [_system(LM_INSTRUCTION), _user(_caption_and_lyrics(caption, lyrics))]


def phase1_unconditional_messages(lyrics: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> list[Message]:
    """Phase 1's CFG branch: the negative prompt in place of the caption, or no caption section at all."""
    if has_meaningful_negative_prompt(negative_prompt):
        return [_system(LM_INSTRUCTION), _user(_caption_and_lyrics(negative_prompt, lyrics))]
    return [_system(LM_INSTRUCTION), _user(f"# Lyric\n{lyrics}\n")]


def phase1_prompt(caption: str, lyrics: str) -> str:
    return render_chat(phase1_messages(caption, lyrics), add_generation_prompt=True)


def phase1_unconditional_prompt(lyrics: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> str:
    return render_chat(phase1_unconditional_messages(lyrics, negative_prompt), add_generation_prompt=True)


def phase2_messages(caption: str, lyrics: str) -> list[Message]:
    """Phase 2 (audio codes): the same turns as phase 1; the metadata block follows the rendered
    generation prompt (see `phase2_prompt`)."""
    return phase1_messages(caption, lyrics)


def phase2_unconditional_messages(
    caption: str, lyrics: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, *, legacy: bool = False
) -> list[Message]:
    """Phase 2's CFG branch: the negative prompt itself as the user turn when it is meaningful, else
    `NO USER INPUT`. `legacy`: the caption (or meaningful negative prompt) and lyrics in the
    `# Caption/# Lyric` layout instead."""
    meaningful = has_meaningful_negative_prompt(negative_prompt)
    if legacy:
        return phase1_messages(negative_prompt if meaningful else caption, lyrics)
    return [_system(LM_INSTRUCTION), _user(negative_prompt if meaningful else DEFAULT_NEGATIVE_PROMPT)]


def phase2_prompt(caption: str, lyrics: str, cot_block: str) -> str:
    """The codes prompt: phase 1's prompt, then the metadata block and two newlines (the assistant
    turn stays open: the model continues with the audio codes)."""
    return render_chat(phase2_messages(caption, lyrics), add_generation_prompt=True) + cot_block + COT_SUFFIX


def phase2_unconditional_prompt(
    caption: str, lyrics: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, *, legacy: bool = False
) -> str:
    messages = phase2_unconditional_messages(caption, lyrics, negative_prompt, legacy=legacy)
    return render_chat(messages, add_generation_prompt=True) + EMPTY_COT + COT_SUFFIX


def unconditional_prompt(
    caption: str, lyrics: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, *, generation_phase: str = "cot",
    is_batch: bool = False, legacy: bool = False,
) -> str:
    """The CFG branch of a generation prompt as the reference picks it: phase 1's (caption dropped or
    replaced by the negative prompt) for a single `cot` request; phase 2's for `codes` and for every
    batched request (the reference's batch path always builds the codes-phase branch)."""
    if generation_phase not in ("cot", "codes"):
        raise ValueError(f"generation_phase must be 'cot' or 'codes', got {generation_phase!r}")
    if generation_phase == "cot" and not is_batch:
        return phase1_unconditional_prompt(lyrics, negative_prompt)
    return phase2_unconditional_prompt(caption, lyrics, negative_prompt, legacy=legacy)


# ---- the LM's other tasks: understand (codes -> text), inspiration, format ----------------------


def _single_turn(instruction: str, content: str) -> str:
    return render_chat([_system(instruction), _user(content)], add_generation_prompt=True)


def _negative_content(negative_prompt: str) -> str:
    # Unlike the generation prompts, these CFG branches keep the sentinel 'NO USER INPUT' as text.
    return negative_prompt if negative_prompt and negative_prompt.strip() else ""


def understanding_prompt(audio_codes: str) -> str:
    """Audio codes -> caption, lyrics and metadata: the code tokens are the whole user turn."""
    return _single_turn(UNDERSTAND_INSTRUCTION, audio_codes)


def understanding_unconditional_prompt(negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> str:
    return _single_turn(UNDERSTAND_INSTRUCTION, _negative_content(negative_prompt))


def inspiration_prompt(query: str, instrumental: bool = False) -> str:
    """"Simple mode": a free-text description expanded into a full sample."""
    return _single_turn(INSPIRATION_INSTRUCTION, f"{query}\n\ninstrumental: {'true' if instrumental else 'false'}")


def inspiration_unconditional_prompt(negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> str:
    return _single_turn(INSPIRATION_INSTRUCTION, _negative_content(negative_prompt))


def format_prompt(caption: str, lyrics: str) -> str:
    """Rewrite a caption and lyrics; unlike the generation prompts there is no trailing newline."""
    return _single_turn(FORMAT_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}")


def format_unconditional_prompt(negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> str:
    return _single_turn(FORMAT_INSTRUCTION, _negative_content(negative_prompt))


# ---- the metadata block ------------------------------------------------------------------------


def _cot_value(key: str, value: Any) -> Any:
    if key == "timesignature":
        if not isinstance(value, str):
            # The reference fails here too (it calls str.endswith on the value).
            raise TypeError(f"timesignature must be a string, got {type(value).__name__} {value!r}")
        if value.endswith("/4"):
            value = value.split("/")[0]
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # str.isdigit also accepts '²', which int() refuses: the reference fails alike
    return value


def format_cot_block(metadata: Mapping[str, Any]) -> str:
    """The `<think>` block the phase-2 prompt pre-fills: bpm, caption, duration, keyscale, language
    and timesignature (others, and None values, dropped) as sorted YAML.

    e.g. `<think>\\nbpm: 96\\nduration: 150\\nkeyscale: G major\\ntimesignature: 3\\n</think>`

    Digit-only strings become integers; a time signature over 4 keeps only its numerator. Empty
    metadata gives `<think>\\n\\n</think>`.
    """
    items = {key: _cot_value(key, metadata[key]) for key in COT_KEYS if metadata.get(key) is not None}
    body = yaml.dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"<think>\n{body}\n</think>"


def _reasoning_text(text: str) -> str:
    """The text of the first `<think>` (else `<reasoning>`) block; when there is none, or it is
    empty, everything before the first audio code."""
    match = next((found for pattern in _REASONING if (found := pattern.search(text))), None)
    reasoning = match.group(1).strip() if match else ""
    return reasoning or text.split("<|audio_code_")[0].strip()


def _store_field(metadata: dict[str, Any], key: str | None, lines: list[str]) -> None:
    if not key or not lines:
        return
    value = "\n".join(lines)
    if key in _INT_FIELDS:
        try:
            metadata[key] = int(value.strip())
        except ValueError:
            metadata[key] = value.strip()
    elif key == "caption":
        # YAML continuation lines folded into one line; YAML quotes are kept.
        metadata[key] = " ".join(stripped for stripped in (line.strip() for line in value.split("\n")) if stripped)
    elif key in _PLAIN_FIELDS:
        metadata[key] = value.strip()


def parse_lm_output(text: str) -> tuple[dict[str, Any], str]:
    """LM output -> (metadata, audio-code string).

    Metadata comes from the reasoning block, line by line: a line starting with '<' is skipped; an
    unindented line with ':' opens a field (key lower-cased); lines indented with a space or tab
    continue it; other lines are ignored. bpm and duration become int when they parse as one; the
    caption's lines are joined with single spaces; fields without a value, and unknown keys, are
    dropped. The code string is every well-formed `<|audio_code_N|>` token, concatenated.
    """
    metadata: dict[str, Any] = {}
    key: str | None = None
    lines: list[str] = []
    for line in _reasoning_text(text).split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            _store_field(metadata, key, lines)
            name, first = line.split(":", 1)
            key, lines = name.strip().lower(), [first] if first.strip() else []
        elif line.startswith((" ", "\t")) and key:
            lines.append(line)
    _store_field(metadata, key, lines)
    return metadata, extract_audio_code_string(text)


def extract_audio_code_string(text: str) -> str:
    """The well-formed `<|audio_code_N|>` tokens of `text`, joined without separators."""
    return "".join(_AUDIO_CODE_TOKEN.findall(text))


def parse_audio_codes(text: str) -> list[int]:
    """The integers of the well-formed `<|audio_code_N|>` tokens, clamped to the codebook (0..63999)."""
    return [min(int(digits), MAX_AUDIO_CODE) for digits in _AUDIO_CODE_VALUE.findall(text)]


# ---- user metadata, token budgets --------------------------------------------------------------


def _positive_int(value: Any) -> int | None:
    try:
        number = float(value)
        return int(number) if number > 0 else None
    except (TypeError, ValueError, OverflowError):
        return None


def _given_text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip() and value.strip().lower() != "n/a":
        return value.strip()
    return None


def user_metadata(bpm: Any = None, keyscale: Any = None, timesignature: Any = None, duration: Any = None) -> dict[str, Any]:
    """The values the user gave, as phase 1 forces them into the metadata block: bpm and duration as
    positive ints (truncated), keyscale and timesignature stripped (not validated: '4/4' stays).
    Missing, blank, 'N/A' and non-positive values are left out. The vocal language and the caption
    are never injected."""
    values = {
        "bpm": _positive_int(bpm),
        "keyscale": _given_text(keyscale),
        "timesignature": _given_text(timesignature),
        "duration": _positive_int(duration),
    }
    return {key: value for key, value in values.items() if value is not None}


def has_all_metas(metadata: Mapping[str, Any] | None) -> bool:
    """Phase 1 is skipped when the user gave bpm, keyscale, timesignature and duration."""
    return metadata is not None and all(key in metadata for key in USER_METADATA_KEYS)


def max_new_tokens(
    target_duration: float | None, phase: str, *, max_duration: int = DURATION_MAX, max_model_len: int = MAX_MODEL_LEN
) -> int:
    """The token budget of one LM call (`phase` is 'cot' or 'codes').

    With a target duration (clamped to 10 s .. the GPU tier's `max_duration`, at most 600 s):
    5 tokens a second plus 10 (codes) or 500 (cot). Without one: 600 s worth plus 500. Never more
    than the model length minus 64.
    """
    if phase not in ("cot", "codes"):
        raise ValueError(f"phase must be 'cot' or 'codes', got {phase!r}")
    if target_duration is not None and target_duration > 0:
        seconds = max(DURATION_MIN, min(min(max_duration, DURATION_MAX), target_duration))
        budget = int(seconds * CODES_PER_SECOND) + (_CODES_TOKEN_MARGIN if phase == "codes" else _COT_TOKEN_MARGIN)
    else:
        budget = DURATION_MAX * CODES_PER_SECOND + _COT_TOKEN_MARGIN
    return min(budget, max_model_len - _MODEL_LEN_RESERVE)


def eos_blocked_until_codes(target_duration: float | None) -> int | None:
    """How many codes phase 2 must emit before EOS is allowed (and then forced): 5 a second,
    truncated, not clamped; None (no constraint) without a positive target."""
    if target_duration is None or target_duration <= 0:
        return None
    return int(target_duration * CODES_PER_SECOND)
