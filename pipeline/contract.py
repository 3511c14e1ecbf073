"""The generation contract, defined once: the typed request every part speaks (the HTTP function
validates it, the job row stores it, the worker rebuilds it, the pipeline runs it), the result
document's fields, the domain rules (languages, keys, time signatures, limits, task types, model
names) and the options a worker gives its pipeline.

Light on purpose: the HTTP function imports it, so it imports neither torch nor numpy, nor anything
of the pipeline. A field added to `GenerationRequest` reaches the pipeline with nothing else to change.
"""

import itertools
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema

log = logging.getLogger(__name__)

# ---- domain rules ------------------------------------------------------------------------------

SAMPLE_RATE = 48000
LATENT_HZ = 25  # latent frames per second of audio (the VAE's hop: 1920 samples)
# The VAE's tiling (pipeline.vae.tiles, Vae.encode/decode defaults): a sequence over one chunk runs in
# cores of chunk - 2 x overlap latent frames, each with up to `overlap` frames of context a side.
VAE_CHUNK_FRAMES, VAE_OVERLAP_FRAMES = 512, 64
LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu",
    "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no", "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr",
    "sv", "sw", "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh", "unknown",
)
KEY_NOTES = "ABCDEFG"
KEY_ACCIDENTALS = ("", "#", "b", "\u266f", "\u266d")
KEY_MODES = ("major", "minor")
KEY_SCALES = tuple(f"{n}{a} {m}" for n, a, m in itertools.product(KEY_NOTES, KEY_ACCIDENTALS, KEY_MODES))
# The LM writes a time signature as its beats ("4"); a request may add the beat unit ("4/4").
TIME_SIGNATURE_BEATS = ("2", "3", "4", "6")
TIME_SIGNATURE_UNITS = ("2", "4", "8", "16")
BPM_MIN, BPM_MAX = 30, 300
DURATION_MIN, DURATION_MAX = 10, 600  # seconds a request (or the LM) may ask for
MAX_BATCH_SIZE = 8
MAX_SEED = 2**32 - 1
MAX_INFERENCE_STEPS = 200
TURBO_STEPS = 8  # the turbo's fixed table (no inference_steps given): 8 steps
TURBO_MAX_STEPS = 20  # turbo runs at most min(inference_steps, 20) steps; custom timesteps snap to its 20 trained values
API_TASK_TYPES = ("text2music", "cover", "cover-nofsq", "repaint", "lego", "extract", "complete")
# tasks that read src audio; cover-nofsq: cover with the raw source latents as context (no FSQ round trip)
SOURCE_TASK_TYPES = ("cover", "cover-nofsq", "repaint", "lego", "extract", "complete")
BASE_MODEL_TASK_TYPES = ("lego", "extract", "complete")  # only the base DiT was trained for these
BASE_MODELS = ("acestep-v15-base", "acestep-v15-xl-base")  # the DiTs that run BASE_MODEL_TASK_TYPES
DIT_KINDS = ("turbo", "base", "sft")
AUDIO_FORMATS = ("mp3", "wav", "flac")
# A request's audio inputs by role: the field naming the file (the worker makes it a local path).
INPUT_PATH_FIELDS = {"src": "src_audio_path", "ref": "reference_audio_path"}
LM_BACKENDS = ("vllm", "pt")
LM_PREFIX = "acestep-5Hz-lm-"
DIT_PREFIX = "acestep-v15-"
DEFAULT_DIT_MODEL = "acestep-v15-turbo"
DEFAULT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
DEFAULT_LM_NEGATIVE_PROMPT = "NO USER INPUT"
_DIT_NAME = re.compile(rf"{re.escape(DIT_PREFIX)}[A-Za-z0-9._-]+")

_KEY_SCALE = re.compile(
    rf"^[{KEY_NOTES}]({'|'.join(re.escape(a) for a in KEY_ACCIDENTALS if a)})? ({'|'.join(KEY_MODES)})$", re.IGNORECASE
)
_SHORT_KEY = re.compile(r"^([A-Ga-g](?:#|b|\u266f|\u266d)?)\s*(m|min|minor|maj|major|M)?$")
_TIME_SIGNATURE = re.compile(rf"^({'|'.join(TIME_SIGNATURE_BEATS)})(/({'|'.join(TIME_SIGNATURE_UNITS)}))?$")

# The optional keys a job result carries beside audio_keys, generation_info, status_message and
# seed_value: what the LM decided and which models made the audio.
RESULT_INFO_FIELDS = ("bpm", "duration", "genres", "keyscale", "timesignature", "metas", "lm_model", "lm_backend", "dit_model",
                      # what the analysis modes answer instead of audio
                      "audio_codes", "caption", "lyrics", "language")


# Where each pipeline stage sits on the 0..1 `progress` a poll shows. The pipeline reports through
# `stage_progress(stage, within)`; the ETA reads a running job's place in its stage back with
# `within_stage`, so a running job's remaining work comes from its stage and progress.
STAGE_SPANS = {
    "claimed": (0.0, 0.0),
    "preparing": (0.0, 0.03),
    "lm": (0.03, 0.30),
    "conditioning": (0.30, 0.35),
    "dit": (0.35, 0.80),
    "vae": (0.80, 0.95),
    "encoding": (0.95, 0.98),
    "uploading": (0.98, 1.0),
}
STAGES = tuple(STAGE_SPANS)


def stage_progress(stage: str, within: float) -> float:
    """The overall progress of a run `within` (0..1) of the way through `stage`."""
    lo, hi = STAGE_SPANS[stage]
    return lo + (hi - lo) * min(max(float(within), 0.0), 1.0)


def within_stage(stage: str | None, progress: float | None) -> float:
    """How far (0..1) into `stage` an overall `progress` lies (0 for an unknown stage)."""
    lo, hi = STAGE_SPANS.get(stage or "", (0.0, 0.0))
    if hi <= lo:
        return 0.0
    return min(max(((progress or 0.0) - lo) / (hi - lo), 0.0), 1.0)


# ---- the request -------------------------------------------------------------------------------

# Codes for the longest song: 5 per second, each written "<|audio_code_N|>" (at most 20 characters).
MAX_CODE_STRING_CHARS = DURATION_MAX * 5 * 20 + 1000
_CodeString = Annotated[str, StringConstraints(max_length=MAX_CODE_STRING_CHARS)]


LORA_MAX_ADAPTERS = 4
LORA_SCALE_MAX = 2.0
LORA_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_LORA_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class LoraChoice(BaseModel):
    """One LoRA/LoKr adapter a job runs with: an adapter the caller uploaded (POST /v1/lora/adapters)
    or a folder under the workers' <checkpoint dir>/loras/, by name, at a scale. The server fills
    `storage_key` and `digest` at submit (the caller's upload of that name; null: a checkpoint-dir
    adapter) and the worker `path` (the local folder); what a client sends there is replaced."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="Adapter name ([A-Za-z0-9._-], 1-64 characters)")
    scale: float = Field(1.0, ge=0, le=LORA_SCALE_MAX, description="Strength (0-2; 0: as without the adapter)")
    storage_key: SkipJsonSchema[str | None] = Field(None, max_length=500)
    digest: SkipJsonSchema[str | None] = Field(None, max_length=80)
    path: SkipJsonSchema[str | None] = Field(None, max_length=4096)

    @field_validator("name")
    @classmethod
    def _not_dots(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError("must not be . or .. (it names a folder)")
        return value

    @field_validator("digest")
    @classmethod
    def _digest_form(cls, value: str | None) -> str | None:
        if value is not None and not _LORA_DIGEST.fullmatch(value):
            raise ValueError("must be sha256:<64 hex digits>")
        return value


def _lora_text(text: str) -> Any:
    """A form's `lora`: JSON text (a list or one object), or "name[:scale]" entries separated by commas."""
    text = text.strip()
    if not text or text == "null":
        return None
    if text[0] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError('must be a list of {"name", "scale"} objects (or JSON text of one)') from None
    entries = []
    for part in text.split(","):
        name, _, scale = part.strip().partition(":")
        entries.append({"name": name.strip()} | ({"scale": scale.strip()} if scale.strip() else {}))
    return entries


class GenerationRequest(BaseModel):
    """One generation as the seed API defines it: every field with its one default and limits.
    Unknown fields and out-of-range values are refused (422 naming the field)."""

    model_config = ConfigDict(extra="forbid", str_max_length=20_000, title="GenerateRequest", allow_inf_nan=False)

    caption: str = Field("", description="Music description prompt")
    lyrics: str = Field("", description="Lyrics content")
    thinking: bool = Field(False, description="Use the 5 Hz LM to generate audio codes (LM -> DiT)")
    vocal_language: str = Field("en", description="Lyrics language (en, zh, ja, ... or unknown)")
    audio_format: Literal["mp3", "wav", "flac"] = Field("mp3", description="Output format")

    bpm: int | None = Field(None, ge=BPM_MIN, le=BPM_MAX, description="Tempo (30-300); the LM fills it when missing")
    key_scale: str = Field("", description='Key and scale, e.g. "C Major"; the LM fills it when empty')
    time_signature: str = Field("", description='Time signature, e.g. "4/4"; the LM fills it when empty')
    audio_duration: float | None = Field(None, ge=DURATION_MIN, le=DURATION_MAX, description="Seconds (10-600)")

    audio_code_string: _CodeString | list[_CodeString] = Field(
        "", description="5 Hz audio codes; a list gives one per batch item")

    model: str | None = Field(
        None, description=f"The DiT to run: a checkpoint folder name ({DIT_PREFIX}...), e.g. acestep-v15-turbo, "
                          "acestep-v15-base, acestep-v15-sft, acestep-v15-xl-turbo; null: the deployment's default "
                          "(lego, extract and complete: a base model)")
    inference_steps: int = Field(8, ge=1, le=MAX_INFERENCE_STEPS, description="Diffusion steps (1-200)")
    guidance_scale: float = Field(7.0, ge=0, le=30, description="Prompt guidance (non-turbo models)")
    use_random_seed: bool = Field(True, description="Draw a fresh seed per item")
    seed: int | list[int] = Field(-1, description='Seed when use_random_seed is false; "42,43" gives one per item')
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="Songs per request (1-8)")

    lm_model_path: str | None = Field(None, description="5 Hz LM checkpoint name, e.g. acestep-5Hz-lm-0.6B")
    lm_backend: Literal["vllm", "pt"] = Field("vllm", description="LM backend")
    lm_temperature: float = Field(0.85, gt=0, le=5, description="LM sampling temperature")
    lm_cfg_scale: float = Field(2.0, ge=0, le=20, description="LM CFG scale (>1 enables CFG)")
    lm_negative_prompt: str = Field(DEFAULT_LM_NEGATIVE_PROMPT, description="Negative prompt used by LM CFG")
    lm_top_k: int | None = Field(None, ge=0, description="Top-k (0 or null disables)")
    lm_top_p: float = Field(0.9, gt=0, le=1, description="Top-p (0-1; 1 disables)")
    lm_repetition_penalty: float = Field(1.0, gt=0, le=10, description="Repetition penalty")
    use_cot_caption: bool = Field(True, description="Let the LM rewrite the caption in its reasoning (thinking)")
    use_cot_language: bool = Field(True, description="Let the LM detect the vocal language in its reasoning")
    use_format: bool = Field(False, description="Let the LM format caption and lyrics (and fill metas) first")
    sample_mode: bool = Field(False, description="Let the LM write caption, lyrics and metas from sample_query")
    sample_query: str = Field("", description="What to make in sample mode, e.g. 'a calm piano ballad'")

    reference_audio_path: str | None = Field(None, description="Reference audio (style) in the input area")
    src_audio_path: str | None = Field(None, description="Source audio for cover and repaint")
    task_type: Literal["text2music", "cover", "cover-nofsq", "repaint", "lego", "extract", "complete"] = Field(
        "text2music", description="Task type (lego, extract and complete need a base model; cover-nofsq: cover "
                                  "with the raw source latents as context, no FSQ round trip)")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="Edit instruction")
    global_caption: str = Field("", description="Whole-song description for lego (the caption describes the track)")
    track_name: str | None = Field(None, description="Track for lego and extract, e.g. vocals, drums")
    track_classes: list[str] | None = Field(None, max_length=16, description="Tracks for complete")
    repainting_start: float = Field(0.0, ge=-DURATION_MAX, le=DURATION_MAX, description="Repaint window start (s; < 0 pads)")
    repainting_end: float | None = Field(None, ge=-1, le=2 * DURATION_MAX, description="Repaint window end (s; null or -1: end)")
    audio_cover_strength: float = Field(1.0, ge=0, le=1, description="Cover strength (0-1)")

    # ---- the DiT sampler (upstream main's names and defaults) ----
    shift: float = Field(3.0, ge=1.0, le=5.0, description="Timestep shift (1-5): t' = s*t / (1 + (s-1)*t)")
    timesteps: list[float] | None = Field(
        None, max_length=MAX_INFERENCE_STEPS + 1,
        description='Custom schedule, a list or comma text "0.97,0.76,0.615,0.5,0.395,0.28,0.18,0.085,0": values '
                    "in [0, 1], strictly decreasing, at least one > 0; overrides inference_steps and shift (turbo "
                    f"snaps each to the nearest of its {TURBO_MAX_STEPS} trained values; base/SFT use them verbatim)")
    infer_method: Literal["ode", "sde"] = Field("ode", description="ode: deterministic; sde: re-noise after each step")
    sampler_mode: Literal["euler", "heun"] = Field(
        "euler", description="euler: one decoder call per step; heun: a corrector call too (about twice the DiT time)")
    velocity_norm_threshold: float = Field(
        0.0, ge=0, description="Clamp the velocity's norm to this multiple of the latent's (0: off)")
    velocity_ema_factor: float = Field(
        0.0, ge=0, lt=1, description="Blend this share of the previous step's velocity into each step's (0: off)")
    dcw_enabled: bool = Field(True, description="Wavelet-domain correction (DCW) after every step")
    dcw_mode: Literal["double", "low", "high", "pix"] = Field("double", description="Bands DCW corrects")
    dcw_scaler: float = Field(0.05, ge=0, le=1, description="DCW strength on the low band (0-1)")
    dcw_high_scaler: float = Field(0.02, ge=0, le=1, description="DCW strength on the high band, double mode (0-1)")
    dcw_wavelet: Literal["haar"] = Field("haar", description="DCW wavelet; only haar is implemented")
    use_adg: bool = Field(False, description="Angle-based dynamic guidance instead of APG (base and SFT models only)")
    cfg_interval_start: float = Field(
        0.0, ge=0, le=1, description="Guidance only from this t (0-1; base and SFT models only)")
    cfg_interval_end: float = Field(
        1.0, ge=0, le=1, description="Guidance only up to this t (0-1, >= cfg_interval_start; base and SFT models only)")
    cover_noise_strength: float = Field(
        0.0, ge=0, le=1, description="Cover: start part-way down the schedule from the noised source (0: from noise)")
    chunk_mask_mode: Literal["auto", "explicit", "auto_fixed"] = Field(
        "auto", description="The context's chunk mask. auto: upstream main, where the intended 2.0 sentinel is lost "
                            "in a bool tensor and the model gets 1.0 everywhere (the repaint span too); auto_fixed: "
                            "PR #1290's behaviour, 2.0; explicit: 0/1, 0 over the repaint span")
    repaint_mode: Literal["conservative", "balanced", "aggressive"] = Field(
        "balanced", description="Repaint: how the new span meets the source (conservative: full injection, 25-frame "
                                "blend, 0.05 s splice; balanced: set by repaint_strength; aggressive: no injection, "
                                "no splice)")
    repaint_strength: float = Field(0.5, ge=0, le=1, description="Repaint, balanced mode: 0 keeps most of the "
                                                                 "source around the span, 1 the least")
    repaint_latent_crossfade_frames: int = Field(
        10, ge=0, description="Accepted and unused, as upstream (repaint_mode and repaint_strength set the blend)")
    repaint_wav_crossfade_sec: float = Field(
        0.0, ge=0, description="Accepted and unused, as upstream (repaint_mode and repaint_strength set the splice)")
    retake_seed: int | list[int] | None = Field(
        None, description='Seed of the retake noise, like seed: an integer, a list or "42,43" (one per item); -1 or '
                          "null: random (used when retake_variance > 0)")
    retake_variance: float = Field(
        0.0, ge=0, le=1, description="How far to move the start noise toward the retake noise (0: none, 1: all)")

    # ---- analysis instead of audio (upstream's analysis modes) ----
    extract_codes_only: bool = Field(
        False, description="Only the source audio's 5 Hz codes (result audio_codes), no audio; needs source audio")
    full_analysis_only: bool = Field(
        False, description="Analyse the source audio: its codes through the LM (caption, lyrics, bpm, key, ...), no audio")
    analysis_only: bool = Field(
        False, description="Only the LM's metadata for caption and lyrics (bpm, key, duration, ...), no audio")

    # ---- decoding and the waveform ----
    latent_shift: float = Field(0.0, description="Added to the latents before the VAE decodes them")
    latent_rescale: float = Field(1.0, gt=0, description="Latents are multiplied by this (> 0) before decoding")
    enable_normalization: bool = Field(True, description="Peak-normalise each song to normalization_db")
    normalization_db: float = Field(-1.0, ge=-60, le=0, description="Peak level normalisation aims at (dBFS, -60 to 0)")
    fade_in_duration: float = Field(0.0, ge=0, le=60, description="Fade-in (s, 0-60)")
    fade_out_duration: float = Field(0.0, ge=0, le=60, description="Fade-out (s, 0-60)")

    # ---- LoRA / LoKr adapters ----
    lora: list[LoraChoice] | None = Field(
        None, description=f"Adapters to run the DiT with (at most {LORA_MAX_ADAPTERS}), each {{\"name\", \"scale\" (0-2, "
                          "default 1)}: an adapter uploaded with POST /v1/lora/adapters, else a folder under the workers' "
                          "<checkpoint dir>/loras/. A form may send JSON text or \"name:scale,name\". null: the API key's "
                          "default from /v1/lora/load (if any); []: no adapter")

    webhook_url: str | None = Field(None, max_length=2048, description="http(s) URL POSTed when the job finishes")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any, info: ValidationInfo) -> Any:
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("must not contain NUL characters (\\u0000)")
        return value

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_forms(cls, value: Any) -> Any:
        """JSON or short text (forms), one object, or a list of names or objects."""
        if isinstance(value, str):
            value = _lora_text(value)
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list):
            value = [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("lora")
    @classmethod
    def _lora_set(cls, value: list[LoraChoice] | None) -> list[LoraChoice] | None:
        if value is None:
            return None
        if len(value) > LORA_MAX_ADAPTERS:
            raise ValueError(f"at most {LORA_MAX_ADAPTERS} adapters")
        names = [choice.name for choice in value]
        if len(set(names)) != len(names):
            raise ValueError("names an adapter more than once")
        return value

    @field_validator("vocal_language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in LANGUAGES:
            raise ValueError(f"must be one of {', '.join(sorted(LANGUAGES))}")
        return value

    @field_validator("seed", "retake_seed", mode="before")
    @classmethod
    def _seed_list(cls, value: Any, info: ValidationInfo) -> Any:
        """An integer, or several (a list, or the reference's comma-separated text "42,43"), one per
        item; parsed here so a bad value is refused under the field's own name."""
        if info.field_name == "retake_seed" and (value is None or (isinstance(value, str) and not value.strip())):
            return None
        parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        seeds = []
        for part in parts:
            if isinstance(part, str) and not part.strip() and len(parts) > 1:
                continue
            try:
                if isinstance(part, bool) or (isinstance(part, float) and not part.is_integer()):
                    raise ValueError
                seeds.append(int(part.strip()) if isinstance(part, str) else int(part))
            except (TypeError, ValueError):
                raise ValueError('must be an integer or integers (a list or "42,43")') from None
        return seeds if isinstance(value, list) or (isinstance(value, str) and "," in value) else seeds[0]

    @field_validator("seed", "retake_seed")
    @classmethod
    def _seed_range(cls, value: int | list[int] | None) -> int | list[int] | None:
        if value is None:
            return None
        seeds = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not 1 <= len(value) <= MAX_BATCH_SIZE:
            raise ValueError(f"as a list needs 1 to {MAX_BATCH_SIZE} seeds")
        if any(not -1 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"must be -1 (random) or 0 to {MAX_SEED}")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_blank(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model")
    @classmethod
    def _dit_name(cls, value: str | None) -> str | None:
        if value is not None and not _DIT_NAME.fullmatch(value.strip()):
            raise ValueError(f"must name a DiT checkpoint folder ({DIT_PREFIX}...), e.g. {DEFAULT_DIT_MODEL} or "
                             f"{BASE_MODELS[0]}")
        return None if value is None else value.strip()

    @field_validator("timesteps", mode="before")
    @classmethod
    def _timestep_text(cls, value: Any) -> Any:
        """The reference's comma text ("0.97,0.76,...,0"), optionally in brackets, as a list."""
        if not isinstance(value, str):
            return value
        text = value.strip().removeprefix("[").removesuffix("]").strip()
        if not text:
            return None
        try:
            return [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError('must be numbers, as a list or comma-separated text ("0.97,0.76,0.5,0")') from None

    @field_validator("timesteps")
    @classmethod
    def _timestep_schedule(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must hold at least one value (or be null for the schedule of inference_steps and shift)")
        if any(not 0.0 <= t <= 1.0 for t in value):
            raise ValueError("each value must be in [0, 1]")
        if any(b >= a for a, b in zip(value, value[1:])):
            raise ValueError("must be strictly decreasing")
        if value[0] <= 0:
            raise ValueError("needs at least one value above 0")
        return value

    @field_validator("track_classes", mode="before")
    @classmethod
    def _track_class_text(cls, value: Any) -> Any:
        """A form sends text: one class, "drums,bass", or a JSON list (the reference wraps text in a list)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError('must be a list of track names, e.g. ["drums", "bass"] or "drums,bass"') from None
        return [part.strip() for part in text.split(",") if part.strip()] or None

    @field_validator("dcw_wavelet", mode="before")
    @classmethod
    def _haar_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() != "haar":
            raise ValueError(f"only the haar wavelet is implemented here; {value.strip()!r} is not")
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cfg_interval_end")
    @classmethod
    def _interval_ordered(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("cfg_interval_start")
        if start is not None and value < start:
            raise ValueError(f"must be at least cfg_interval_start ({start})")
        return value

    @field_validator("key_scale", mode="before")
    @classmethod
    def _short_key_scale(cls, value: Any) -> Any:
        """Short spellings the reference accepts ("Am", "C#m", "Bbmaj", "F# min", "G") as the
        "<note> major|minor" form the models were trained on."""
        if not isinstance(value, str):
            return value
        match = _SHORT_KEY.match(value.strip())
        if not match:
            return value
        note, mode = match.group(1), match.group(2) or ""
        minor = mode != "M" and mode.lower() in ("m", "min", "minor")
        return f"{note[0].upper()}{note[1:]} {'minor' if minor else 'major'}"

    @field_validator("key_scale")
    @classmethod
    def _known_key_scale(cls, value: str) -> str:
        if value and not _KEY_SCALE.match(value.strip()):
            raise ValueError('must be a note A-G, an optional # or b, and major or minor, e.g. "C Major"')
        return value.strip()

    @field_validator("time_signature")
    @classmethod
    def _known_time_signature(cls, value: str) -> str:
        if value and not _TIME_SIGNATURE.match(value.strip()):
            raise ValueError(f"must be {', '.join(TIME_SIGNATURE_BEATS)} beats, optionally over "
                             f"{', '.join(TIME_SIGNATURE_UNITS)}, e.g. \"4/4\"")
        return value.strip()

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Syntax always (what the dispatcher could not send to, credentials, `0177.0.0.1`-style
        addresses); with the API's policy in the validation context (`webhook_allow_networks`) also
        non-public IP literals and names. Stored rows (no context) are checked for syntax only."""
        from pipeline.urls import check_webhook_url

        if value is None:
            return None
        check_webhook_url(value, (info.context or {}).get("webhook_allow_networks"))
        return value

    @field_validator("audio_code_string")
    @classmethod
    def _code_list_size(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_BATCH_SIZE:
            raise ValueError(f"as a list needs 1 to {MAX_BATCH_SIZE} entries, one per batch item")
        return value

    @field_validator("batch_size")
    @classmethod
    def _matches_code_list(cls, value: int | None, info: ValidationInfo) -> int | None:
        codes = info.data.get("audio_code_string")
        if value is not None and isinstance(codes, list) and len(codes) != value:
            raise ValueError(f"is {value} but audio_code_string lists {len(codes)} entries")
        return value

    @field_validator("task_type")
    @classmethod
    def _source_audio_present(cls, value: str, info: ValidationInfo) -> str:
        if value in SOURCE_TASK_TYPES and not info.data.get("src_audio_path"):
            raise ValueError(f"{value} needs source audio: src_audio_path or an uploaded src_audio")
        return value

    @field_validator("extract_codes_only", "full_analysis_only")
    @classmethod
    def _analysis_source(cls, value: bool, info: ValidationInfo) -> bool:
        """Both source analyses read the source audio."""
        if value and not info.data.get("src_audio_path"):
            raise ValueError("analyses source audio: give src_audio_path or upload src_audio")
        return value

    @field_validator("repainting_end")
    @classmethod
    def _after_start(cls, value: float | None, info: ValidationInfo) -> float | None:
        start = info.data.get("repainting_start")
        if value is not None and value != -1 and start is not None and value <= start:
            raise ValueError("must be after repainting_start (or -1 / null for the end of the audio)")
        return value

    def effective_batch_size(self, default: int) -> int:
        """The batch the job will run: explicit, else one per listed code string, else the server's default."""
        if self.batch_size is not None:
            return self.batch_size
        if isinstance(self.audio_code_string, list):
            return len(self.audio_code_string)
        return default

    @property
    def items(self) -> int:
        """Songs this request makes (a stored job always has its batch size resolved)."""
        return self.batch_size or 1


# What a job row's `request` document holds beside the request's own fields.
# input_digests: {role: "sha256:<hex>"} of each uploaded input, so a retried submit (same
# Idempotency-Key, same files) is recognised although each attempt stores its upload under its own key.
STORED_KEYS = ("inputs", "batch_key", "lm_task", "input_digests")


class StoredRequestError(ValueError):
    """A stored request this version cannot run (the job fails with this message)."""


def request_from_row(document: Mapping[str, Any]) -> GenerationRequest:
    """The request of a stored job row. Tolerant of rows written by another version: keys this
    version does not know are dropped with a warning (an option since removed), fields it added
    take their defaults; values it no longer accepts raise StoredRequestError naming the field."""
    fields = GenerationRequest.model_fields
    unknown = sorted(set(document) - set(fields) - set(STORED_KEYS))
    if unknown:
        log.warning("stored request has fields this version does not know; ignored: %s", ", ".join(unknown),
                    extra={"action": "stored_request_unknown_fields", "fields": unknown})
    try:
        return GenerationRequest.model_validate({k: v for k, v in document.items() if k in fields})
    except ValueError as exc:
        raise StoredRequestError(f"the stored request is not valid for this worker version: {exc}") from None


def request_document(request: GenerationRequest, **stored: Any) -> dict[str, Any]:
    """What the job row stores: the request's fields and the STORED_KEYS given."""
    unknown = set(stored) - set(STORED_KEYS)
    if unknown:
        raise ValueError(f"not a stored key: {', '.join(sorted(unknown))}")
    return request.model_dump(mode="json") | stored


# ---- the DiT a request runs on, and what that model allows ---------------------------------------


class RequestOptionError(ValueError):
    """A request option the model it would run on cannot honour; `field` names the request field
    (the HTTP function answers 422 naming it, a worker fails the job with the message)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def dit_kind(name: str) -> Literal["turbo", "base", "sft"]:
    """What a DiT is, from its folder name's parts: "turbo" anywhere makes it turbo, else "sft", else
    "base" (acestep-v15-turbo-shift1 and acestep-v15-xl-turbo are turbo). ValueError for other names."""
    lowered = name.strip().lower()
    if "turbo" in lowered:
        return "turbo"
    parts = re.split(r"[-_./\\]", lowered)
    for kind in ("sft", "base"):
        if kind in parts:
            return kind
    raise ValueError(f"cannot tell whether DiT {name!r} is a turbo, base or SFT model")


def _kind(name: str) -> str | None:
    try:
        return dit_kind(name)
    except ValueError:
        return None


def resolve_model(request: GenerationRequest, default: str) -> str:
    """The DiT a request runs on: the one it names; else, for the base-only tasks, the deployment's
    default if that is a base model, otherwise acestep-v15-base; else the deployment's default."""
    if request.model:
        return request.model
    if request.task_type in BASE_MODEL_TASK_TYPES:
        return default if _kind(default) == "base" else BASE_MODELS[0]
    return default


def check_model_options(request: GenerationRequest, model: str) -> None:
    """Refuse options `model` cannot honour (RequestOptionError naming the field). A model whose
    kind the name does not tell is not judged here (the worker that loads it decides)."""
    kind = _kind(model)
    if kind is None:
        return
    if request.task_type in BASE_MODEL_TASK_TYPES and kind != "base":
        raise RequestOptionError("task_type", f"{request.task_type} runs only on a base model ({', '.join(BASE_MODELS)}); "
                                              f"{model} is a {kind} model")
    if kind == "turbo":
        guidance = "only base and SFT models use guidance"
        if request.use_adg:
            raise RequestOptionError("use_adg", f"{guidance}; {model} is a turbo model (leave use_adg false)")
        if request.cfg_interval_start != 0.0:
            raise RequestOptionError("cfg_interval_start", f"{guidance}; {model} is a turbo model (leave it 0)")
        if request.cfg_interval_end != 1.0:
            raise RequestOptionError("cfg_interval_end", f"{guidance}; {model} is a turbo model (leave it 1)")
        steps = sum(1 for t in request.timesteps or () if t > 0)
        if steps > TURBO_MAX_STEPS:
            raise RequestOptionError("timesteps", f"{model} is a turbo model: it snaps custom timesteps to its "
                                                  f"{TURBO_MAX_STEPS} trained values and runs at most {TURBO_MAX_STEPS} "
                                                  f"steps; this list has {steps} non-zero values")
    elif request.timesteps is not None and len(request.timesteps) < 2:
        raise RequestOptionError("timesteps", f"{model} is a {kind} model: its schedule runs from each value to the "
                                              "next, so it needs at least 2 values (e.g. 1.0,0)")


# ---- what a worker gives its pipeline ------------------------------------------------------------


@dataclass(frozen=True)
class PipelineOptions:
    """Everything a pipeline is configured with beyond its checkpoints (from Settings; the pipeline
    reads no environment). `variables` names the ACESTEP_* variable of each field, for messages."""

    device: str | None = None  # cpu, cuda, cuda:N; None: CUDA when present
    dit_model: str = DEFAULT_DIT_MODEL
    lm_models: tuple[str, ...] = ()  # () = every LM folder in the checkpoints
    lm_model: str | None = None  # the LM used without lm_model_path; None: the 1.7B if loaded, else the first
    lm_max_duration: int = DURATION_MAX
    vllm: bool = True
    vllm_gpu_memory_utilization: float = 0.3
    dit_models: tuple[str, ...] = ()  # DiT folders loaded beside dit_model (requests name them in `model`)
    # None: every DiT served is loaded at start; else GiB the DiTs may take together: dit_model at start,
    # the others on first use, the least recently used evicted (pipeline/dit_store.py).
    dit_memory_budget_gb: float | None = None

    variables = {
        "device": "ACESTEP_DEVICE", "dit_model": "ACESTEP_DIT_MODEL", "dit_models": "ACESTEP_DIT_MODELS",
        "lm_models": "ACESTEP_LM_MODELS",
        "lm_model": "ACESTEP_LM_MODEL", "lm_max_duration": "ACESTEP_LM_MAX_DURATION", "vllm": "ACESTEP_VLLM",
        "vllm_gpu_memory_utilization": "ACESTEP_VLLM_GPU_MEMORY_UTILIZATION",
        "dit_memory_budget_gb": "ACESTEP_DIT_MEMORY_BUDGET_GB",
    }


# ---- which jobs may share one GPU pass ---------------------------------------------------------------

# The request fields that are one value for a whole DiT batch (the schedule, guidance, sampler,
# cover/repaint numbers, the model and its adapters); the rest (prompts, seeds, sources, lengths,
# audio codes, post-processing) may differ from job to job.
BATCH_FIELDS = (
    "model", "lora", "task_type", "inference_steps", "shift", "timesteps", "infer_method", "sampler_mode",
    "velocity_norm_threshold", "velocity_ema_factor", "dcw_enabled", "dcw_mode", "dcw_scaler", "dcw_high_scaler",
    "dcw_wavelet", "use_adg", "cfg_interval_start", "cfg_interval_end", "guidance_scale", "audio_cover_strength",
    "cover_noise_strength", "repaint_mode", "repaint_strength",
)


def batch_signature(request: GenerationRequest) -> str:
    """Equal for requests that may run as one DiT batch (their BATCH_FIELDS agree)."""
    fields = request.model_dump(mode="json", include=set(BATCH_FIELDS) & set(type(request).model_fields))
    return json.dumps(fields, sort_keys=True)
