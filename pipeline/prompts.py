"""The text the DiT's text encoder reads: caption prompt, lyric prompt, metas block, task instruction.

Every string here is byte-exact with what the ACE-Step 1.5 reference builds (checked against the
prompt fixtures, `dit_*` and `sft_caption_extraction_cases` sections). Reference quirks are kept on
purpose, because the DiT was trained on them:

* the metas block prints a float bpm as given (`99.6`) but truncates the duration (`95.9` -> `95 seconds`);
* a missing duration reads `30 seconds`, whatever length the audio actually gets;
* the key/scale is kept unstripped when it has any non-space character (`' C major '`);
* the instruction always ends with `:` (one is appended when missing).
"""

import re
from collections.abc import Mapping, Sequence

from pipeline import contract

CAPTION_MAX_TOKENS = 256
LYRIC_MAX_TOKENS = 2048

END_OF_TEXT = "<|endoftext|>"
SFT_GEN_PROMPT = "# Instruction\n{instruction}\n\n# Caption\n{caption}\n\n# Metas\n{metas}" + END_OF_TEXT + "\n"
LYRIC_PROMPT = "# Languages\n{language}\n\n# Lyric\n{lyrics}" + END_OF_TEXT

NOT_AVAILABLE = "N/A"
DEFAULT_DURATION = "30 seconds"

TASK_INSTRUCTIONS: Mapping[str, str] = {
    "text2music": contract.DEFAULT_INSTRUCTION,
    "repaint": "Repaint the mask area based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "cover-nofsq": "Generate audio semantic tokens based on the given conditions:",
    "extract": "Extract the {TRACK_NAME} track from the audio:",
    "extract_default": "Extract the track from the audio:",
    "lego": "Generate the {TRACK_NAME} track based on the audio context:",
    "lego_default": "Generate the track based on the audio context:",
    "complete": "Complete the input track with {TRACK_CLASSES}:",
    "complete_default": "Complete the input track:",
}
TASK_TYPES = ("text2music", "repaint", "cover", "cover-nofsq", "extract", "lego", "complete")
BASE_ONLY_TASK_TYPES = ("extract", "lego", "complete")
TASK_TYPES_TURBO = tuple(task for task in TASK_TYPES if task not in BASE_ONLY_TASK_TYPES)
TASK_TYPES_BASE = TASK_TYPES
# How an error names the task types: the API's six, then the cover variant the reference also knows.
TASK_TYPES_TEXT = ", ".join(task for task in TASK_TYPES if task != "cover-nofsq") + " (or cover-nofsq)"
TRACK_NAMES = (
    "woodwinds", "brass", "fx", "synth", "strings", "percussion",
    "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
)

DEFAULT_INSTRUCTION = TASK_INSTRUCTIONS["text2music"]
SEGMENT_MARKER = "a segment"  # an instruction for one segment: the lego-SFT caption has no Global line
# What the DiT gets whenever LM audio codes are supplied: text2music with codes runs as `cover`.
LM_CODES_INSTRUCTION = TASK_INSTRUCTIONS["cover"]

_SFT_CAPTION = re.compile(r"#\s*Caption\s*\n(.*?)(?:\n\s*#\s*Metas|$)", re.DOTALL)


def metas_dict(
    bpm: int | float | str | None = None,
    key_scale: str | None = None,
    time_signature: str | None = None,
    duration: int | float | None = None,
) -> dict[str, int | float | str]:
    """The metas as the reference's `_build_metadata_dict` holds them; no `duration` key when it is None."""
    metas: dict[str, int | float | str] = {
        "bpm": bpm if bpm else NOT_AVAILABLE,
        "keyscale": key_scale if key_scale and key_scale.strip() else NOT_AVAILABLE,
        "timesignature": (
            time_signature if time_signature and time_signature.strip() and time_signature != NOT_AVAILABLE else NOT_AVAILABLE
        ),
    }
    if duration is not None:
        metas["duration"] = f"{int(duration)} seconds"
    return metas


def render_metas(metas: Mapping[str, object]) -> str:
    """The `- bpm: …` block for a metas dict; a numeric duration is truncated, a missing one reads 30 seconds."""
    duration = metas.get("duration", 30)
    if isinstance(duration, int | float):
        duration = f"{int(duration)} seconds"
    elif not isinstance(duration, str):
        duration = DEFAULT_DURATION
    return (
        f"- bpm: {metas.get('bpm', NOT_AVAILABLE)}\n"
        f"- timesignature: {metas.get('timesignature', NOT_AVAILABLE)}\n"
        f"- keyscale: {metas.get('keyscale', NOT_AVAILABLE)}\n"
        f"- duration: {duration}\n"
    )


def format_metas(
    bpm: int | float | str | None = None,
    key_scale: str | None = None,
    time_signature: str | None = None,
    duration: int | float | None = None,
) -> str:
    """The metas block of the caption prompt.

    e.g. `- bpm: 120\\n- timesignature: 4\\n- keyscale: C major\\n- duration: 180 seconds\\n`

    bpm is printed as given when truthy (0 and None read N/A); key_scale as given unless blank;
    time_signature as given unless blank or 'N/A'; duration is `int(seconds)`, or 30 seconds when None.
    With no arguments this is the reference's default metas.
    """
    return render_metas(metas_dict(bpm, key_scale, time_signature, duration))


def format_instruction(instruction: str) -> str:
    """The instruction with a trailing ':' added when it has none."""
    return instruction if instruction.endswith(":") else instruction + ":"


def caption_prompt(instruction: str, caption: str, metas: str) -> str:
    """The caption prompt (SFT_GEN_PROMPT) for the text encoder; `metas` is a `format_metas` block.

    The instruction gets its trailing ':' here; the caption is used as given (run it through
    `extract_sft_caption` first, as the reference does).
    """
    return SFT_GEN_PROMPT.format(instruction=format_instruction(instruction), caption=caption, metas=metas)


def dit_caption(
    caption: str, instruction: str, *, is_lego_sft: bool = False, global_caption: str = "", chunk_mask_mode: str = "auto"
) -> str:
    """The caption the caption prompt holds. Ordinary checkpoints: the caption itself. A lego-SFT
    checkpoint (`is_lego_sft` in its config): `Global: <global caption>` (omitted for a "... a
    segment ..." instruction), `Local: <caption>` and `Mask Control: false` for chunk mask mode
    `auto`, else `true`, one per line."""
    if not is_lego_sft:
        return caption
    lines = [] if SEGMENT_MARKER in instruction else [f"Global: {global_caption}"]
    lines += [f"Local: {caption}", f"Mask Control: {'false' if chunk_mask_mode == 'auto' else 'true'}"]
    return "\n".join(lines)


def text_input_for_logging(caption_prompt_text: str, lyric_prompt_text: str) -> str:
    """The caption and lyric prompts as the reference logs them (one string, a blank line between)."""
    return f"{caption_prompt_text}\n\n{lyric_prompt_text}"


def lyric_prompt(lyrics: str, language: str) -> str:
    """The lyric prompt; lyrics are used verbatim (an instrumental is `""` or `"[inst]"`, no marker)."""
    return LYRIC_PROMPT.format(language=language, lyrics=lyrics)


def extract_sft_caption(caption: str) -> str:
    """The bare caption from a caption that is itself an SFT prompt (has '# Instruction' and '# Caption').

    Anything else is returned unchanged.
    """
    if "# Instruction" in caption and "# Caption" in caption:
        match = _SFT_CAPTION.search(caption)
        if match:
            return match.group(1).strip()
    return caption


def instruction_for(task_type: str, track_name: str | None = None, track_classes: Sequence[str] | None = None) -> str:
    """The task instruction for a task type, as the reference's `generate_instruction` builds it.

    `track_name` (extract, lego) is upper-cased into the instruction; `track_classes` (complete) are
    upper-cased and joined with ' | '. Without them the `<task>_default` instruction is used; the
    other task types ignore both. `cover-nofsq` (cover without the FSQ round trip) has the cover
    instruction.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES_TEXT}; got {task_type!r}")
    if task_type in ("extract", "lego"):
        if track_name:
            return TASK_INSTRUCTIONS[task_type].format(TRACK_NAME=track_name.upper())
        return TASK_INSTRUCTIONS[f"{task_type}_default"]
    if task_type == "complete":
        if track_classes:
            return TASK_INSTRUCTIONS["complete"].format(TRACK_CLASSES=" | ".join(c.upper() for c in track_classes))
        return TASK_INSTRUCTIONS["complete_default"]
    return TASK_INSTRUCTIONS[task_type]
