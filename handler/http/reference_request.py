"""The reference API server's request conventions, mapped onto our one request model.

Clients of the reference server (`/release_task`, `/format_input`, `/v1/music/random`, the chat
adapter) send the same generation options under many names: snake_case or camelCase, short
aliases (`key`, `duration`, `language`, `description`, ...), and nested in `param_obj` or in a
`metas` / `metadata` / `user_metadata` object, as dicts or JSON strings. `ReferenceParams` reads a
canonical name from those sources in the reference's order: the flat body first, then
`param_obj`, then the metas object; within one source the first alias present wins (so `prompt`
beats `caption`); a null counts as absent.

`generation_fields` turns such a body into the fields of `pipeline.contract.GenerationRequest`
(validated by the same model and the same submit path as `/v1/music/generate`), plus the options
the reference accepts that this server does not act on yet (a name in ALIASES that is no field of
the request, such as `use_tiled_decode`, and any unknown key): those are returned, never refused, so
the caller can list them back to the client. The sampler and post-processing options of upstream
main (shift, timesteps, DCW, guidance interval, repaint mode, retake, normalisation, fades, ...) are
request fields, so they are applied.
"""

from collections.abc import Mapping
from typing import Any

from handler.http.body import parse_json
from pipeline.contract import GenerationRequest

# canonical name -> the names a client may use for it, in precedence order.
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "caption"),
    "global_caption": ("global_caption", "globalCaption"),
    "lyrics": ("lyrics",),
    "thinking": ("thinking",),
    "analysis_only": ("analysis_only", "analysisOnly"),
    "full_analysis_only": ("full_analysis_only", "fullAnalysisOnly"),
    "extract_codes_only": ("extract_codes_only", "extractCodesOnly"),
    "sample_mode": ("sample_mode", "sampleMode"),
    "sample_query": ("sample_query", "sampleQuery", "description", "desc"),
    "use_format": ("use_format", "useFormat", "format"),
    "model": ("model", "model_name", "modelName", "dit_model", "ditModel"),
    "key_scale": ("key_scale", "keyscale", "keyScale", "key"),
    "time_signature": ("time_signature", "timesignature", "timeSignature"),
    "audio_duration": ("audio_duration", "duration", "audioDuration", "target_duration", "targetDuration"),
    "vocal_language": ("vocal_language", "vocalLanguage", "language"),
    "bpm": ("bpm",),
    "inference_steps": ("inference_steps", "inferenceSteps"),
    "guidance_scale": ("guidance_scale", "guidanceScale"),
    "use_random_seed": ("use_random_seed", "useRandomSeed"),
    "seed": ("seed",),
    "batch_size": ("batch_size", "batchSize"),
    "audio_cover_strength": ("audio_cover_strength", "audioCoverStrength", "cover_strength", "coverStrength"),
    "cover_noise_strength": ("cover_noise_strength", "coverNoiseStrength"),
    "audio_code_string": ("audio_code_string", "audioCodeString", "audio_codes"),
    "reference_audio_path": ("reference_audio_path", "ref_audio_path", "referenceAudioPath", "refAudioPath"),
    "src_audio_path": ("src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
    "task_type": ("task_type", "taskType"),
    "infer_method": ("infer_method", "inferMethod"),
    "use_tiled_decode": ("use_tiled_decode", "useTiledDecode"),
    "constrained_decoding": ("constrained_decoding", "constrainedDecoding", "constrained"),
    "constrained_decoding_debug": ("constrained_decoding_debug", "constrainedDecodingDebug"),
    "use_cot_caption": ("use_cot_caption", "cot_caption", "cot-caption"),
    "use_cot_language": ("use_cot_language", "cot_language", "cot-language"),
    "is_format_caption": ("is_format_caption", "isFormatCaption"),
    "allow_lm_batch": ("allow_lm_batch", "allowLmBatch", "parallel_thinking"),
    "instruction": ("instruction",),
    "track_name": ("track_name", "trackName"),
    "track_classes": ("track_classes", "trackClasses", "instruments"),
    "sampler_mode": ("sampler_mode", "samplerMode"),
    "velocity_norm_threshold": ("velocity_norm_threshold", "velocityNormThreshold"),
    "velocity_ema_factor": ("velocity_ema_factor", "velocityEmaFactor"),
    "latent_shift": ("latent_shift", "latentShift"),
    "latent_rescale": ("latent_rescale", "latentRescale"),
    "repainting_start": ("repainting_start", "repaintingStart"),
    "repainting_end": ("repainting_end", "repaintingEnd"),
    "audio_format": ("audio_format", "audioFormat"),
    "lm_model_path": ("lm_model_path", "lmModelPath"),
    "lm_backend": ("lm_backend", "lmBackend"),
    "lm_temperature": ("lm_temperature", "lmTemperature"),
    "lm_cfg_scale": ("lm_cfg_scale", "lmCfgScale"),
    "lm_top_k": ("lm_top_k", "lmTopK"),
    "lm_top_p": ("lm_top_p", "lmTopP"),
    "lm_repetition_penalty": ("lm_repetition_penalty", "lmRepetitionPenalty"),
    "lm_negative_prompt": ("lm_negative_prompt", "lmNegativePrompt"),
    "webhook_url": ("webhook_url", "webhookUrl"),
    # upstream main's sampler and post-processing options
    "shift": ("shift",),
    "timesteps": ("timesteps",),
    "dcw_enabled": ("dcw_enabled", "dcwEnabled"),
    "dcw_mode": ("dcw_mode", "dcwMode"),
    "dcw_scaler": ("dcw_scaler", "dcwScaler"),
    "dcw_high_scaler": ("dcw_high_scaler", "dcwHighScaler"),
    "dcw_wavelet": ("dcw_wavelet", "dcwWavelet"),
    "use_adg": ("use_adg", "useAdg"),
    "cfg_interval_start": ("cfg_interval_start", "cfgIntervalStart"),
    "cfg_interval_end": ("cfg_interval_end", "cfgIntervalEnd"),
    "chunk_mask_mode": ("chunk_mask_mode", "chunkMaskMode"),
    "repaint_mode": ("repaint_mode", "repaintMode"),
    "repaint_strength": ("repaint_strength", "repaintStrength"),
    "repaint_latent_crossfade_frames": ("repaint_latent_crossfade_frames", "repaintLatentCrossfadeFrames"),
    "repaint_wav_crossfade_sec": ("repaint_wav_crossfade_sec", "repaintWavCrossfadeSec"),
    "retake_seed": ("retake_seed", "retakeSeed"),
    "retake_variance": ("retake_variance", "retakeVariance"),
    "enable_normalization": ("enable_normalization", "enableNormalization"),
    "normalization_db": ("normalization_db", "normalizationDb", "normalizationDB"),
    "fade_in_duration": ("fade_in_duration", "fadeInDuration"),
    "fade_out_duration": ("fade_out_duration", "fadeOutDuration"),
    # per-job LoRA/LoKr adapters: a list of {name, scale}, JSON text of one, or "name:scale,name"
    "lora": ("lora", "loras"),
}
KNOWN_KEYS = frozenset(alias for aliases in ALIASES.values() for alias in aliases)
METAS_KEYS = ("metas", "meta", "metadata", "user_metadata", "userMetadata")
# Body fields that are not generation options: credentials and the nested sources themselves.
NOT_OPTIONS = {"ai_token", "param_obj", *METAS_KEYS}

# The reference's /release_task defaults where they differ from the seed API's.
REFERENCE_DEFAULTS = {"lm_cfg_scale": 2.5}
# The canonical name -> our request field, where they differ.
OUR_FIELD = {"prompt": "caption"}
BOOLEAN_FIELDS = {"thinking", "sample_mode", "use_format", "use_random_seed", "use_cot_caption", "use_cot_language",
                  "use_adg", "dcw_enabled", "enable_normalization", "analysis_only", "full_analysis_only", "extract_codes_only"}
INT_FIELDS = {"bpm", "inference_steps", "batch_size", "lm_top_k", "repaint_latent_crossfade_frames"}
FLOAT_FIELDS = {"audio_duration", "guidance_scale", "repainting_start", "repainting_end", "audio_cover_strength",
                "lm_temperature", "lm_cfg_scale", "lm_top_p", "lm_repetition_penalty", "shift",
                "velocity_norm_threshold", "velocity_ema_factor", "dcw_scaler", "dcw_high_scaler",
                "cfg_interval_start", "cfg_interval_end", "cover_noise_strength", "repaint_strength",
                "repaint_wav_crossfade_sec", "retake_variance", "latent_shift", "latent_rescale", "normalization_db",
                "fade_in_duration", "fade_out_duration"}
# Choices read case-insensitively, as the reference compares them.
CHOICE_FIELDS = {"infer_method", "sampler_mode", "dcw_mode", "dcw_wavelet", "chunk_mask_mode", "repaint_mode", "task_type"}
# Output formats the reference offers beyond ours, as the nearest format we write.
AUDIO_FORMAT_EQUIVALENTS = {"wav32": "wav"}
# The reference's LM backends beyond ours: mlx (Apple silicon) runs here as pt.
LM_BACKEND_EQUIVALENTS = {"mlx": "pt"}


def parse_json_object(value: Any) -> dict[str, Any]:
    """A dict, or a JSON string of one; anything else is no source (the reference ignores it)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value.strip():
        try:
            parsed = parse_json(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def as_bool(value: Any, default: bool) -> bool:
    """The reference's reading of a flag: 1/true/yes/y/on (any case) is true, other text false."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "y", "on"}


def _number(value: Any, integer: bool) -> Any:
    """Text that reads as a number becomes one ("120", "120.0" for an int); other text is passed on
    unchanged so validation names the field."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return value
    if integer:
        return int(number) if number.is_integer() else value
    return number


class ReferenceParams:
    """One request body read the reference's way (see the module docstring)."""

    def __init__(self, body: Mapping[str, Any]):
        self.raw = dict(body)
        self.param_obj = parse_json_object(self.raw.get("param_obj"))
        self.metas = next((parse_json_object(self.raw[k]) for k in METAS_KEYS if self.raw.get(k)), {})
        self.sources = (self.raw, self.param_obj, self.metas)

    def find(self, name: str) -> tuple[str, Any] | None:
        """(the key used, its value) for a canonical name, or None when absent."""
        for source in self.sources:
            for alias in ALIASES.get(name, (name,)):
                if source.get(alias) is not None:
                    return alias, source[alias]
        return None

    def get(self, name: str, default: Any = None) -> Any:
        found = self.find(name)
        return default if found is None else found[1]

    def text(self, name: str, default: str = "") -> str:
        value = self.get(name)
        return default if value is None else str(value)



def generation_fields(body: Mapping[str, Any]) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(fields for GenerationRequest, the model asked for or None, options accepted but not acted on).

    Empty strings count as absent (form clients send every field); numbers may come as text;
    flags read as the reference reads them. Values are not judged here: the request model does
    that, and its 422 names our field."""
    params = ReferenceParams(body)
    ours = set(GenerationRequest.model_fields)
    fields: dict[str, Any] = {}
    not_applied: dict[str, Any] = {}
    for name in ALIASES:
        found = params.find(name)
        if found is None or name == "model":
            continue
        value = found[1]
        field = OUR_FIELD.get(name, name)
        if field not in ours:
            not_applied[name] = value
            continue
        if isinstance(value, str) and not value.strip() and field not in ("lyrics", "caption", "lm_negative_prompt"):
            continue
        if field in BOOLEAN_FIELDS:
            value = as_bool(value, bool(GenerationRequest.model_fields[field].default))
        elif field in INT_FIELDS or field in FLOAT_FIELDS:
            value = _number(value, field in INT_FIELDS)
        elif field in CHOICE_FIELDS and isinstance(value, str):
            value = value.strip().lower()
        elif field == "track_classes" and isinstance(value, str):
            value = parse_json_list(value)
        elif field == "audio_format" and isinstance(value, str):
            value = AUDIO_FORMAT_EQUIVALENTS.get(value.strip().lower(), value.strip().lower())
        elif field == "lm_backend" and isinstance(value, str):
            value = LM_BACKEND_EQUIVALENTS.get(value.strip().lower(), value.strip().lower())
        fields[field] = value
    for name, default in REFERENCE_DEFAULTS.items():
        fields.setdefault(name, default)
    # Anything else the client sent (the reference ignores unknown fields): listed back.
    for key, value in params.raw.items():
        if key not in NOT_OPTIONS and key not in KNOWN_KEYS:
            not_applied[key] = value
    model = params.text("model").strip() or None
    return fields, model, not_applied


def parse_json_list(value: str) -> list[str]:
    """`track_classes` as text: a JSON list, or one name."""
    try:
        parsed = parse_json(value)
    except ValueError:
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [value]
