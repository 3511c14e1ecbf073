"""The 5 Hz LM's own tasks, beside the generation flow of `planner`: **format** (caption and lyrics
rewritten, metadata filled), **create sample** (simple / inspiration mode: a description becomes a
caption, lyrics and metadata) and **understand** (audio codes become metadata, caption and lyrics);
the lyrics parser they share; and the API glue that applies `sample_mode` / `sample_query` /
`use_format` to a generation request before it is planned (`prepare_llm_inputs`).

Pure functions of their inputs and an `LMBackend` (no torch, no model), byte-exact with the
reference (ACE-Step 1.5 6d467e4, 2026-06-26; `python -m pipeline.prompt_conformance` checks the
prompts, the request each task sends and the results). What the reference does, kept on purpose:

* the tasks never use CFG; each is one `TextRequest` in the "understand" phase (metadata block,
  `</think>`, then free text) with `stop_at_reasoning` off and genres generated;
* format: an empty caption becomes `NO USER INPUT` and empty lyrics `[Instrumental]` in the prompt;
  the user's bpm and duration are `int()`-ed (non-positive or unparseable values are dropped) and,
  with keyscale, timesignature and language, forced into the metadata block; a given language also
  sets `skip_language`; without lyrics in the output the (replaced) input lyrics are returned;
* create sample: a language other than `unknown` is forced in (`skip_language` stays false); an
  empty query becomes `NO USER INPUT`; an instrumental request without lyrics in the output gets
  `[Instrumental]`;
* understand: the code string is the whole user turn; empty codes become `NO USER INPUT` (the LM then
  invents an example);
* results: bpm an int (`N/A` and unparseable -> None), duration a float, `N/A` text fields -> "".
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.lm import prompts as lm_prompts
from pipeline.lm.backend import LMBackend, Sampling, TextRequest

NO_USER_INPUT = lm_prompts.DEFAULT_NEGATIVE_PROMPT
INSTRUMENTAL_LYRICS = "[Instrumental]"
NOT_AVAILABLE = "N/A"
GENERATION_PHASE = "understand"
TASKS = ("format", "create_sample", "understand")

# The tasks' default sampling temperature: the API-level functions use 0.85; the reference's
# lower-level understand entry point (not exposed by its API) defaults to 0.3.
DEFAULT_TEMPERATURE = 0.85
UNDERSTAND_HANDLER_TEMPERATURE = 0.3
# A task's token budget: None is the reference's (the cot budget without a target duration, 3500).
TEXT_MAX_NEW_TOKENS: int | None = None
# The API glue's top-p when a request gives none below 1 (the reference's quirk, kept).
API_DEFAULT_TOP_P = 0.9

_LYRICS_HEADER = re.compile(r"^#\s*Lyri[c|cs]?\s*\n", re.IGNORECASE)  # '[c|cs]' is a character class: '# Lyrics' stays
_TRAILING_END = re.compile(r"<\|im_end\|>\s*$")


class LMUnavailableError(RuntimeError):
    """A task (or sample_mode / sample_query / use_format) needs the 5 Hz LM and none is loaded."""


@dataclass
class FormatResult:
    """`format_sample`'s answer (the reference's FormatSampleResult)."""

    caption: str = ""
    lyrics: str = ""
    bpm: int | None = None
    duration: float | None = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    status_message: str = ""
    success: bool = True
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnderstandResult(FormatResult):
    """`understand_music`'s answer (the reference's UnderstandResult): the same fields."""


@dataclass
class SampleResult(FormatResult):
    """`create_sample`'s answer (the reference's CreateSampleResult): format's fields and whether
    the song is instrumental."""

    instrumental: bool = False


# ---- parsing -----------------------------------------------------------------------------------


def extract_lyrics(output: str) -> str:
    """The lyrics of a task's output: everything after the first `</think>`, stripped, without a
    leading `# Lyric` header (`#lyric`, `# Lyri` too, any case; not `# Lyrics`) and a trailing
    `<|im_end|>`. No `</think>`: no lyrics."""
    _, found, after = output.partition("</think>")
    if not found:
        return ""
    text = after.strip()
    if not text:
        return ""
    text = _LYRICS_HEADER.sub("", text, count=1)
    text = _TRAILING_END.sub("", text, count=1)
    return text.strip()


def _known(value: Any) -> bool:
    return value is not None and value != NOT_AVAILABLE and value != ""


def _int_or_none(value: Any) -> int | None:
    if not _known(value):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    if not _known(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    return "" if value is None or value == NOT_AVAILABLE else value


def _fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The result fields of parsed task metadata."""
    return {
        "caption": metadata.get("caption", ""),
        "lyrics": metadata.get("lyrics", ""),
        "bpm": _int_or_none(metadata.get("bpm")),
        "duration": _float_or_none(metadata.get("duration")),
        "keyscale": _text(metadata.get("keyscale", "")),
        "language": _text(metadata.get("language", "")),
        "timesignature": _text(metadata.get("timesignature", "")),
    }


# ---- requests ----------------------------------------------------------------------------------


def sampling(temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0) -> Sampling:
    """The tasks' sampling: top-k None/0 and top-p None/>=1 mean off."""
    return Sampling(temperature=float(temperature), top_k=int(top_k) if top_k else None,
                    top_p=float(top_p) if top_p is not None and top_p < 1.0 else None,
                    repetition_penalty=float(repetition_penalty))


def _text_request(prompt: str, options: Mapping[str, Any], *, user_metadata: dict[str, Any] | None = None,
                  skip_language: bool = False) -> TextRequest:
    if not options.get("use_constrained_decoding", True):
        raise ValueError("use_constrained_decoding=false is not supported: the LM always decodes under the FSM")
    budget = options.get("max_new_tokens") or TEXT_MAX_NEW_TOKENS or lm_prompts.max_new_tokens(None, "cot")
    return TextRequest(
        prompt=prompt,
        max_new_tokens=int(budget),
        sampling=sampling(options.get("temperature", DEFAULT_TEMPERATURE), options.get("top_k"), options.get("top_p"),
                          options.get("repetition_penalty", 1.0)),
        user_metadata=user_metadata,
        skip_caption=False,
        skip_language=skip_language,
        skip_genres=False,
        generation_phase=GENERATION_PHASE,
        stop_at_reasoning=False,
        target_duration=None,
        max_duration=int(options.get("max_duration") or lm_prompts.DURATION_MAX),
        seed=options.get("seed"),
    )


def _positive_int(value: Any) -> int | None:
    """`int(value)` when it parses and is positive (as the reference: int('100.5') is dropped)."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number > 0 else None


def format_user_metadata(user_metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The user's values format forces into the metadata block: bpm and duration int()-ed and
    positive, keyscale, timesignature and language when non-empty; None when nothing is left."""
    if not user_metadata:
        return None
    forced: dict[str, Any] = {}
    for key in ("bpm", "duration"):
        if user_metadata.get(key) is not None and (number := _positive_int(user_metadata[key])) is not None:
            forced[key] = number
    for key in ("keyscale", "timesignature", "language"):
        if user_metadata.get(key):
            forced[key] = user_metadata[key]
    return forced or None


def format_request(caption: str, lyrics: str, user_metadata: Mapping[str, Any] | None = None, **options: Any) -> TextRequest:
    caption = caption if caption and caption.strip() else NO_USER_INPUT
    lyrics = lyrics if lyrics and lyrics.strip() else INSTRUMENTAL_LYRICS
    forced = format_user_metadata(user_metadata)
    return _text_request(lm_prompts.format_prompt(caption, lyrics), options, user_metadata=forced,
                         skip_language=bool(forced) and forced.get("language") is not None)


def sample_request(query: str, instrumental: bool = False, vocal_language: str | None = None, **options: Any) -> TextRequest:
    query = query if query and query.strip() else NO_USER_INPUT
    forced = None
    if vocal_language and vocal_language.strip() and vocal_language.strip().lower() != "unknown":
        forced = {"language": vocal_language.strip()}
    return _text_request(lm_prompts.inspiration_prompt(query, instrumental), options, user_metadata=forced)


def understand_request(audio_codes: str, **options: Any) -> TextRequest:
    codes = audio_codes if audio_codes and audio_codes.strip() else NO_USER_INPUT
    return _text_request(lm_prompts.understanding_prompt(codes), options)


# ---- the tasks ---------------------------------------------------------------------------------


def _require(backend: LMBackend | None, task: str) -> LMBackend:
    if backend is None:
        raise LMUnavailableError(f"{task} needs the 5 Hz LM, and none is loaded")
    return backend


def format_sample(backend: LMBackend | None, caption: str, lyrics: str, user_metadata: Mapping[str, Any] | None = None,
                  **options: Any) -> FormatResult:
    """Caption and lyrics -> an enhanced caption, lyrics, bpm, duration, keyscale, language and
    time signature. `user_metadata` (bpm, duration, keyscale, timesignature, language) is forced in.
    `options`: temperature (0.85), top_k, top_p, repetition_penalty, seed, max_new_tokens,
    max_duration, use_constrained_decoding (must be true)."""
    request = format_request(caption, lyrics, user_metadata, **options)
    output = _require(backend, "format").generate_text(request)
    if not output:
        return FormatResult(status_message="the LM returned no text", success=False, error="the LM returned no text")
    metadata, _ = lm_prompts.parse_lm_output(output)
    # The input lyrics as the prompt had them when the LM wrote none.
    metadata["lyrics"] = extract_lyrics(output) or (lyrics if lyrics and lyrics.strip() else INSTRUMENTAL_LYRICS)
    status = f"✅ Format completed successfully\nGenerated fields: {', '.join(metadata)}"
    return FormatResult(**_fields(metadata), status_message=status)


def create_sample(backend: LMBackend | None, query: str, instrumental: bool = False, vocal_language: str | None = None,
                  **options: Any) -> SampleResult:
    """A description -> caption, lyrics (`[Instrumental]` for an instrumental without any), bpm,
    duration, keyscale, language and time signature. `options` as for `format_sample`."""
    request = sample_request(query, instrumental, vocal_language, **options)
    output = _require(backend, "create_sample").generate_text(request)
    if not output:
        return SampleResult(status_message="the LM returned no text", success=False, error="the LM returned no text")
    metadata: dict[str, Any] = lm_prompts.parse_lm_output(output)[0]
    lyrics = extract_lyrics(output)
    if lyrics:
        metadata["lyrics"] = lyrics
    elif instrumental:
        metadata["lyrics"] = INSTRUMENTAL_LYRICS
    metadata["instrumental"] = instrumental
    return SampleResult(**_fields(metadata), instrumental=instrumental,
                        status_message=f"✅ Sample created successfully\nGenerated fields: {metadata}")


def understand_music(backend: LMBackend | None, audio_codes: str, **options: Any) -> UnderstandResult:
    """Audio codes (`<|audio_code_N|>...`) -> caption, lyrics, bpm, duration, keyscale, language and
    time signature; empty codes let the LM invent an example. `options` as for `format_sample`."""
    request = understand_request(audio_codes, **options)
    output = _require(backend, "understand").generate_text(request)
    if not output:
        return UnderstandResult(status_message="the LM returned no text", success=False, error="the LM returned no text")
    metadata, _ = lm_prompts.parse_lm_output(output)
    if lyrics := extract_lyrics(output):
        metadata["lyrics"] = lyrics
    if not metadata:
        return UnderstandResult(status_message="the LM wrote no metadata", success=False, error="the LM wrote no metadata")
    status = f"✅ Understanding completed successfully\nGenerated fields: {', '.join(metadata)}"
    return UnderstandResult(**_fields(metadata), status_message=status)


# ---- the API glue ------------------------------------------------------------------------------

# name -> language code, tried in this order; the first name found in a description wins.
_LANGUAGE_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("en", ("english", "en")),
    ("zh", ("chinese", "中文", "zh", "mandarin")),
    ("ja", ("japanese", "日本語", "ja")),
    ("ko", ("korean", "한국어", "ko")),
    ("es", ("spanish", "español", "es")),
    ("fr", ("french", "français", "fr")),
    ("de", ("german", "deutsch", "de")),
    ("it", ("italian", "italiano", "it")),
    ("pt", ("portuguese", "português", "pt")),
    ("ru", ("russian", "русский", "ru")),
    ("bn", ("bengali", "bn")),
    ("hi", ("hindi", "hi")),
    ("ar", ("arabic", "ar")),
    ("th", ("thai", "th")),
    ("vi", ("vietnamese", "vi")),
    ("id", ("indonesian", "id")),
    ("tr", ("turkish", "tr")),
    ("nl", ("dutch", "nl")),
    ("pl", ("polish", "pl")),
)
_PUNCTUATION = r"[.,;:!?]"


def _name_pattern(name: str) -> re.Pattern[str]:
    # Codes (two letters) count only between spaces, punctuation or the ends; names between word boundaries.
    if len(name) <= 2:
        return re.compile(rf"(?:^|\s|{_PUNCTUATION}){re.escape(name)}(?:$|\s|{_PUNCTUATION})")
    return re.compile(rf"\b{re.escape(name)}\b")


_LANGUAGE_PATTERNS = tuple((code, _name_pattern(name)) for code, names in _LANGUAGE_NAMES for name in names)


def parse_description_hints(description: str | None) -> tuple[str | None, bool]:
    """(language code or None, instrumental) sniffed from a sample query: the first language name
    or code found (English names, a few native ones), and 'instrumental', 'pure music', 'pure
    instrument' or a trailing 'solo' for instrumental."""
    if not description:
        return None, False
    text = description.lower().strip()
    language = next((code for code, pattern in _LANGUAGE_PATTERNS if pattern.search(text)), None)
    instrumental = ("instrumental" in text or "pure music" in text or "pure instrument" in text
                    or text.endswith(" solo") or text == "solo")
    return language, instrumental


@dataclass
class PreparedLlmInputs:
    """A generation's inputs after sample mode and format (the reference's PreparedLlmInputs).
    `lm_results` (not part of the reference's record) holds the task results, in order."""

    lm_top_k: int
    lm_top_p: float
    thinking: bool
    sample_mode: bool
    use_cot_caption: bool
    use_cot_language: bool
    full_analysis_only: bool
    caption: str
    lyrics: str
    bpm: Any
    key_scale: Any
    time_signature: Any
    audio_duration: Any
    original_prompt: str
    original_lyrics: str
    format_has_duration: bool
    global_caption: str = ""
    lm_results: tuple[tuple[str, FormatResult | SampleResult], ...] = field(default=(), repr=False)

    def reference_dict(self) -> dict[str, Any]:
        """The fields the reference records (without `lm_results`)."""
        return {key: value for key, value in asdict(self).items() if key != "lm_results"}


def lm_input_fields(request: Any) -> dict[str, Any]:
    """The fields `prepare_llm_inputs` reads, from our `GenerationRequest` (caption is the
    reference's `prompt`; there is no full-analysis mode)."""
    return {
        "prompt": request.caption, "lyrics": request.lyrics, "bpm": request.bpm, "key_scale": request.key_scale,
        "time_signature": request.time_signature, "audio_duration": request.audio_duration,
        "vocal_language": request.vocal_language, "thinking": request.thinking, "sample_mode": request.sample_mode,
        "sample_query": request.sample_query, "use_format": request.use_format,
        "use_cot_caption": request.use_cot_caption, "use_cot_language": request.use_cot_language,
        "full_analysis_only": False, "lm_temperature": request.lm_temperature, "lm_top_k": request.lm_top_k,
        "lm_top_p": request.lm_top_p, "global_caption": request.global_caption, "task_type": request.task_type,
    }


def uses_lm_inputs(request: Mapping[str, Any]) -> bool:
    """Whether `prepare_llm_inputs` calls the LM for this request."""
    query = request.get("sample_query") or ""
    return bool(request.get("sample_mode") or query.strip() or request.get("use_format"))


def prepare_llm_inputs(
    request: Mapping[str, Any],
    backend: LMBackend | None,
    *,
    create_sample_fn: Callable[..., SampleResult] = create_sample,
    format_sample_fn: Callable[..., FormatResult] = format_sample,
    **options: Any,
) -> PreparedLlmInputs:
    """Sample mode, then format, applied to a generation request (the reference's
    `prepare_llm_generation_inputs`). `request` holds the reference's field names (`prompt`,
    `lyrics`, `bpm`, `key_scale`, `time_signature`, `audio_duration`, `vocal_language`, `thinking`,
    `sample_mode`, `sample_query`, `use_format`, `use_cot_caption`, `use_cot_language`,
    `full_analysis_only`, `lm_temperature`, `lm_top_k`, `lm_top_p`, `global_caption`); `options`
    (seed, max_new_tokens, max_duration) go to each task.

    * sample mode (`sample_mode`, or any `sample_query`): `create_sample` on the query (else
      `NO USER INPUT`) with the instrumental flag sniffed from it, and the request's
      `vocal_language` unless that is en, unknown or empty (then the language sniffed from the
      query); its caption, lyrics, bpm, keyscale, time signature and duration replace the request's;
    * `use_format` with a caption or lyrics: `format_sample` with the bpm, duration (float, when
      positive), keyscale, time signature and language (unless unknown) known so far forced in; its
      caption and lyrics replace the current ones, and its bpm, keyscale, time signature and
      duration where it gave them.

    Raises LMUnavailableError when either step is asked for and `backend` is None; without a
    backend `use_cot_caption` / `use_cot_language` are turned off. Raises RuntimeError when
    create_sample fails.
    """
    top_k = request.get("lm_top_k") or 0
    top_k = top_k if top_k > 0 else 0
    top_p = request.get("lm_top_p")
    top_p = top_p if top_p and top_p < 1.0 else API_DEFAULT_TOP_P
    sample_mode = bool(request.get("sample_mode"))
    query = request.get("sample_query") or ""
    has_query = bool(query.strip())
    use_cot_caption, use_cot_language = bool(request.get("use_cot_caption")), bool(request.get("use_cot_language"))
    if backend is None:
        if sample_mode or has_query or request.get("use_format"):
            asked = "sample_mode/sample_query" if sample_mode or has_query else "use_format"
            raise LMUnavailableError(f"{asked} needs the 5 Hz LM, and this worker has none loaded")
        use_cot_caption = use_cot_language = False
    sampling_kwargs = {"temperature": request.get("lm_temperature", DEFAULT_TEMPERATURE),
                       "top_k": top_k if top_k > 0 else None, "top_p": top_p if top_p < 1.0 else None,
                       "use_constrained_decoding": True}
    caption, lyrics = request.get("prompt"), request.get("lyrics")
    bpm, key_scale = request.get("bpm"), request.get("key_scale")
    time_signature, audio_duration = request.get("time_signature"), request.get("audio_duration")
    vocal_language = request.get("vocal_language")
    results: list[tuple[str, FormatResult | SampleResult]] = []

    if sample_mode or has_query:
        sample_query = query if has_query else NO_USER_INPUT
        hinted_language, instrumental = parse_description_hints(sample_query)
        language = vocal_language if vocal_language and vocal_language not in ("en", "unknown", "") else hinted_language
        sample = create_sample_fn(backend, query=sample_query, instrumental=instrumental, vocal_language=language,
                                  **sampling_kwargs, **options)
        if not sample.success:
            raise RuntimeError(f"create_sample failed: {sample.error or sample.status_message}")
        results.append(("create_sample", sample))
        caption, lyrics, bpm = sample.caption, sample.lyrics, sample.bpm
        key_scale, time_signature, audio_duration = sample.keyscale, sample.timesignature, sample.duration

    format_has_duration = False
    if request.get("use_format") and (caption or lyrics):
        forced: dict[str, Any] = {}
        if bpm is not None:
            forced["bpm"] = bpm
        if audio_duration is not None and float(audio_duration) > 0:
            forced["duration"] = float(audio_duration)
        if key_scale:
            forced["keyscale"] = key_scale
        if time_signature:
            forced["timesignature"] = time_signature
        if vocal_language and vocal_language != "unknown":
            forced["language"] = vocal_language
        formatted = format_sample_fn(backend, caption=caption, lyrics=lyrics, user_metadata=forced or None,
                                     **sampling_kwargs, **options)
        results.append(("format", formatted))
        if formatted.success:
            caption = formatted.caption or caption
            lyrics = formatted.lyrics or lyrics
            if formatted.duration:
                audio_duration, format_has_duration = formatted.duration, True
            bpm = formatted.bpm or bpm
            key_scale = formatted.keyscale or key_scale
            time_signature = formatted.timesignature or time_signature

    return PreparedLlmInputs(
        lm_top_k=top_k, lm_top_p=top_p, thinking=bool(request.get("thinking")), sample_mode=sample_mode,
        use_cot_caption=use_cot_caption, use_cot_language=use_cot_language,
        full_analysis_only=bool(request.get("full_analysis_only")), caption=caption, lyrics=lyrics, bpm=bpm,
        key_scale=key_scale, time_signature=time_signature, audio_duration=audio_duration,
        original_prompt=request.get("prompt") or "", original_lyrics=request.get("lyrics") or "",
        format_has_duration=format_has_duration, global_caption=request.get("global_caption") or "",
        lm_results=tuple(results),
    )
