"""The body of `POST /v1/music/generate`: every parameter of the seed API with its type, default and
allowed range. Unknown fields and out-of-range values are rejected (422 naming the field)."""

import re
from urllib.parse import urlparse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

DEFAULT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
VALID_LANGUAGES = frozenset(
    "ar az bg bn ca cs da de el en es fa fi fr he hi hr ht hu id is it ja ko la lt ms ne nl no pa pl pt "
    "ro ru sa sk sr sv sw ta te th tl tr uk ur vi yue zh unknown".split()
)
_KEY_SCALE = re.compile(r"^[A-G](#|b|♯|♭)? (major|minor)$", re.IGNORECASE)
_TIME_SIGNATURE = re.compile(r"^(2|3|4|6)(/(2|4|8|16))?$")
MAX_BATCH_SIZE = 8
MAX_SEED = 2**32 - 1


class GenerateRequest(BaseModel):
    """A generation request as the seed API defines it."""

    model_config = ConfigDict(extra="forbid", str_max_length=20_000)

    caption: str = Field("", description="Music description prompt")
    lyrics: str = Field("", description="Lyrics content")
    thinking: bool = Field(False, description="Use the 5 Hz LM to generate audio codes (LM -> DiT)")
    vocal_language: str = Field("en", description="Lyrics language (en, zh, ja, ... or unknown)")
    audio_format: Literal["mp3", "wav", "flac"] = Field("mp3", description="Output format")

    bpm: int | None = Field(None, ge=30, le=300, description="Tempo (30-300); the LM fills it when missing")
    key_scale: str = Field("", description='Key and scale, e.g. "C Major"; the LM fills it when empty')
    time_signature: str = Field("", description='Time signature, e.g. "4/4"; the LM fills it when empty')
    audio_duration: float | None = Field(None, ge=10, le=600, description="Seconds (10-600)")

    audio_code_string: str | list[str] = Field("", description="5 Hz audio codes; a list gives one per batch item")

    inference_steps: int = Field(8, ge=1, le=200, description="Diffusion steps (1-200)")
    guidance_scale: float = Field(7.0, ge=0, le=30, description="Prompt guidance (non-turbo models)")
    use_random_seed: bool = Field(True, description="Draw a fresh seed per item")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="Seed when use_random_seed is false")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="Songs per request (1-8)")

    lm_model_path: str | None = Field(None, description="5 Hz LM checkpoint name, e.g. acestep-5Hz-lm-0.6B")
    lm_backend: Literal["vllm", "pt"] = Field("vllm", description="LM backend")
    lm_temperature: float = Field(0.85, gt=0, le=5, description="LM sampling temperature")
    lm_cfg_scale: float = Field(2.0, ge=0, le=20, description="LM CFG scale (>1 enables CFG)")
    lm_negative_prompt: str = Field("NO USER INPUT", description="Negative prompt used by LM CFG")
    lm_top_k: int | None = Field(None, ge=0, description="Top-k (0 or null disables)")
    lm_top_p: float = Field(0.9, gt=0, description="Top-p (>= 1 disables)")
    lm_repetition_penalty: float = Field(1.0, gt=0, le=10, description="Repetition penalty")

    reference_audio_path: str | None = Field(None, description="Reference audio (style) in the input area")
    src_audio_path: str | None = Field(None, description="Source audio for cover and repaint")
    task_type: Literal["text2music", "cover", "repaint"] = Field("text2music", description="Task type")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="Edit instruction")
    repainting_start: float = Field(0.0, ge=-600, le=600, description="Repaint window start (s; < 0 pads)")
    repainting_end: float | None = Field(None, ge=-1, le=1200, description="Repaint window end (s; null or -1: end)")
    audio_cover_strength: float = Field(1.0, ge=0, le=1, description="Cover strength (0-1)")

    webhook_url: str | None = Field(None, max_length=2048, description="http(s) URL POSTed when the job finishes")

    @field_validator("vocal_language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in VALID_LANGUAGES:
            raise ValueError(f"must be one of {', '.join(sorted(VALID_LANGUAGES))}")
        return value

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
            raise ValueError('must be 2, 3, 4 or 6 beats, optionally over 2, 4, 8 or 16, e.g. "4/4"')
        return value.strip()

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http:// or https:// URL")
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
        if value in ("cover", "repaint") and not info.data.get("src_audio_path"):
            raise ValueError(f"{value} needs source audio: src_audio_path or an uploaded src_audio")
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
