"""The glue between a generation request, the 5 Hz LM and the DiT: a pure function of the request's
parameters and an `LMBackend` (no torch, no model).

`plan_generation(params, backend, ...)` decides whether the LM runs, builds its requests, calls the
backend, parses what comes back, merges the metadata (the user's values always win) and returns a
`GenerationPlan` holding everything the DiT side needs: the effective task and instruction, the
caption and lyric prompts of every batch item, the audio codes of every item, the metas block, the
length to generate and the metadata the API reports.

`params` uses the reference's `GenerationParams` names (`keyscale`, `timesignature`, `duration`,
`audio_codes`, ...); any field not given takes its default from `GENERATION_PARAMS_DEFAULTS`, the
reference's defaults. `params_from_request` maps our API's request to them.

Reference behaviour (ACE-Step 1.5, 2026-04-16; phase-2 prompts and DiT captions as of 6d467e4,
2026-06-26), checked by `python -m pipeline.prompt_conformance`:

* the LM is skipped for cover and repaint; otherwise it runs when `thinking` or any `use_cot_*` is on;
* phase 1 (metadata block) runs once per batch, without CFG, with the user's bpm, keyscale,
  timesignature and duration forced in; it is skipped when all four are given, and the phase-2 block
  then holds only those four fields;
* phase 2 (audio codes, only with `thinking` and no user codes) is one request per batch item, all
  passed to the backend in one call, with `lm_cfg_scale` and exactly 5 codes a second of the user's
  duration, else the LM's;
* the DiT gets the LM's caption (`use_cot_caption`) but never the LM's language: its lyric prompt
  always says the request's `vocal_language`;
* text2music with audio codes runs as cover, with the cover instruction;
* a lego-SFT checkpoint (`is_lego_sft`) gets the `Global:/Local:/Mask Control:` caption block.

Our choices where the reference is loose (none of them met by the prompt fixtures):

* no LM backend: `thinking` fails (`LMUnavailableError`); metadata completion falls back to the
  documented defaults (bpm, keyscale, timesignature stay N/A, 30 s of audio);
* phase 2 with no known duration (the reference then lets the LM stop where it likes) asks for
  30 s of codes, the duration the DiT metas already state in that case;
* `lm_repetition_penalty` is honoured (the reference's API ignores it); no string changes;
* `params_from_request` follows API.md: thinking=false lets the LM fill only bpm, keyscale,
  timesignature and duration (codes the request gives are used either way) (caption and language are skipped in its
  metadata block, the user's caption is kept); thinking=true keeps the reference API's behaviour
  (the LM writes caption and language as `use_cot_caption` / `use_cot_language` allow, and the DiT
  gets the LM's caption).

The request's `use_format`, `sample_mode` and `sample_query` run before this, in
`pipeline.lm.tasks.prepare_llm_inputs`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from pipeline import prompts as dit_prompts
from pipeline.contract import GenerationRequest
from pipeline.lm import prompts as lm_prompts
from pipeline.lm.backend import CodesRequest, LMBackend, MetadataRequest, Sampling

# The reference's GenerationParams defaults (the prompt fixtures' constraints.json), plus
# `lm_repetition_penalty`, which our API honours.
GENERATION_PARAMS_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "task_type": "text2music",
    "instruction": dit_prompts.DEFAULT_INSTRUCTION,
    "reference_audio": None,
    "src_audio": None,
    "audio_codes": "",
    "caption": "",
    "global_caption": "",
    "lyrics": "",
    "instrumental": False,
    "vocal_language": "unknown",
    "bpm": None,
    "keyscale": "",
    "timesignature": "",
    "duration": -1.0,
    "enable_normalization": True,
    "normalization_db": -1.0,
    "fade_in_duration": 0.0,
    "fade_out_duration": 0.0,
    "latent_shift": 0.0,
    "latent_rescale": 1.0,
    "inference_steps": 8,
    "seed": -1,
    "guidance_scale": 7.0,
    "use_adg": False,
    "cfg_interval_start": 0.0,
    "cfg_interval_end": 1.0,
    "shift": 1.0,
    "dcw_enabled": True,
    "dcw_mode": "double",
    "dcw_scaler": 0.05,
    "dcw_high_scaler": 0.02,
    "dcw_wavelet": "haar",
    "infer_method": "ode",
    "sampler_mode": "euler",
    "velocity_norm_threshold": 0.0,
    "velocity_ema_factor": 0.0,
    "timesteps": None,
    "retake_seed": None,
    "retake_variance": 0.0,
    "flow_edit_morph": False,
    "flow_edit_source_caption": "",
    "flow_edit_source_lyrics": "",
    "flow_edit_n_min": 0.0,
    "flow_edit_n_max": 1.0,
    "flow_edit_n_avg": 1,
    "repainting_start": 0.0,
    "repainting_end": -1,
    "chunk_mask_mode": "auto",
    "repaint_latent_crossfade_frames": 10,
    "repaint_wav_crossfade_sec": 0.0,
    "repaint_mode": "balanced",
    "repaint_strength": 0.5,
    "audio_cover_strength": 1.0,
    "cover_noise_strength": 0.0,
    "thinking": True,
    "lm_temperature": 0.85,
    "lm_cfg_scale": 2.0,
    "lm_top_k": 0,
    "lm_top_p": 0.9,
    "lm_negative_prompt": lm_prompts.DEFAULT_NEGATIVE_PROMPT,
    "lm_repetition_penalty": 1.0,
    "use_cot_metas": True,
    "use_cot_caption": True,
    "use_cot_lyrics": False,
    "use_cot_language": True,
    "use_constrained_decoding": True,
    "cot_bpm": None,
    "cot_keyscale": "",
    "cot_timesignature": "",
    "cot_duration": None,
    "cot_vocal_language": "unknown",
    "cot_caption": "",
    "cot_lyrics": "",
})

SKIP_LM_TASKS = frozenset({"cover", "cover-nofsq", "repaint"})
# Tasks whose metas duration is the source file's length (or unknown): the request duration is dropped.
SOURCE_LENGTH_TASKS = frozenset({"cover", "cover-nofsq", "repaint", "lego", "extract"})
PHASE1_CFG_SCALE = 1.0  # since 2026-04 the reference runs phase 1 without CFG

# The documented defaults when no LM is available to fill missing metadata.
FALLBACK_METAS_VALUE = dit_prompts.NOT_AVAILABLE  # bpm, keyscale, timesignature in the metas
FALLBACK_DURATION_S = 30.0

class LMUnavailableError(RuntimeError):
    """The request needs the 5 Hz LM (thinking=true) and no backend is loaded."""


@dataclass(frozen=True)
class LMLimits:
    """What the loaded LM allows: the GPU tier's longest duration with the LM, the model length."""

    max_duration: int = lm_prompts.DURATION_MAX
    max_model_len: int = lm_prompts.MAX_MODEL_LEN


@dataclass(frozen=True)
class MetadataFill:
    """bpm, keyscale, timesignature and duration after the LM filled the missing ones (user values
    win). `duration` is seconds or None when unknown; `lm_metadata` is the phase-1 metadata (the
    parsed LM output, or the user's four fields when phase 1 was skipped), None without an LM."""

    bpm: Any
    keyscale: str
    timesignature: str
    duration: float | None
    lm_metadata: dict[str, Any] | None
    request: MetadataRequest | None = None
    output: str | None = None


@dataclass(frozen=True)
class LMTrace:
    """What happened on the LM side, for logs, progress and the conformance runner."""

    invoked: bool
    metadata_request: MetadataRequest | None = None
    metadata_output: str | None = None
    metadata: dict[str, Any] | None = None  # after phase 1
    cot_block: str | None = None  # the phase-2 metadata block
    target_duration: float | None = None  # phase 2's duration (seconds)
    codes_requests: tuple[CodesRequest, ...] = ()
    codes_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanItem:
    """One batch item's DiT inputs. `audio_codes` is None when the item has no codes."""

    caption_prompt: str
    lyric_prompt: str
    non_cover_caption_prompt: str | None  # only when audio_cover_strength < 1
    audio_code_string: str
    audio_codes: list[int] | None


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the DiT side needs for one request.

    `task_type` and `instruction` are the effective ones (text2music with codes -> cover). `caption`
    is the caption in the prompts (LM caption merged in, SFT prompt extracted). `duration` is the
    seconds to generate: the source file's length for tasks that use it, else the requested or LM
    duration, else the codes' length, else 30 s. `metadata` is what the API reports: bpm, duration,
    genres, keyscale, timesignature, language, caption (None or "" when unknown).
    """

    task_type: str
    instruction: str
    caption: str
    lyrics: str
    vocal_language: str
    metas: str
    duration: float
    metadata: dict[str, Any]
    items: tuple[PlanItem, ...]
    lm: LMTrace


# ---- parameters --------------------------------------------------------------------------------


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` over the defaults; unknown fields and options this service does not implement
    (unconstrained decoding, LM-written lyrics) are refused."""
    unknown = sorted(set(params) - set(GENERATION_PARAMS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generation parameter(s): {', '.join(unknown)}")
    resolved = {**GENERATION_PARAMS_DEFAULTS, **params}
    if resolved["task_type"] not in dit_prompts.TASK_TYPES:
        raise ValueError(f"task_type must be one of {dit_prompts.TASK_TYPES_TEXT}; got {resolved['task_type']!r}")
    if not resolved["use_constrained_decoding"]:
        raise ValueError("use_constrained_decoding=false is not supported: the LM always decodes under the FSM")
    if resolved["use_cot_lyrics"]:
        raise ValueError("use_cot_lyrics=true is not supported")
    return resolved


def api_instruction(
    task_type: str, instruction: str | None, track_name: str | None = None, track_classes: Sequence[str] | None = None
) -> str:
    """The instruction our HTTP API gives the DiT: the request's, unless it is empty or the default,
    which follow the task type (as the reference's HTTP API resolves them)."""
    if not instruction or instruction == dit_prompts.DEFAULT_INSTRUCTION:
        return dit_prompts.instruction_for(task_type, track_name, track_classes)
    return instruction


def params_from_request(request: GenerationRequest) -> dict[str, Any]:
    """Our API's request -> params (src/reference audio paths are the worker's local files).

    thinking=true: the LM writes the metadata block (caption and language included, as in the
    reference; `use_cot_caption` / `use_cot_language` false keep the user's caption / leave the
    language out) and the codes, unless the request gives codes. thinking=false: the LM only fills
    missing bpm, key_scale, time_signature and audio_duration (the request's codes are still used)
    (caption and language are skipped in its metadata block). Our API's own defaults (thinking off,
    lm_top_k null) are the request's: this maps names, it adds no defaults of its own.
    """
    thinking = request.thinking
    return {
        "task_type": request.task_type,
        "instruction": api_instruction(request.task_type, request.instruction, request.track_name, request.track_classes),
        "caption": request.caption,
        "global_caption": request.global_caption or "",
        "lyrics": request.lyrics,
        "vocal_language": request.vocal_language,
        "bpm": request.bpm,
        "keyscale": request.key_scale,
        "timesignature": request.time_signature,
        "duration": float(request.audio_duration) if request.audio_duration is not None else -1.0,
        "audio_codes": request.audio_code_string or "",
        "src_audio": request.src_audio_path,
        "reference_audio": request.reference_audio_path,
        "repainting_start": request.repainting_start,
        "repainting_end": request.repainting_end if request.repainting_end is not None else -1,
        "audio_cover_strength": request.audio_cover_strength,
        "thinking": thinking,
        "use_cot_metas": True,
        "use_cot_caption": thinking and request.use_cot_caption,
        "use_cot_language": thinking and request.use_cot_language,
        "lm_temperature": request.lm_temperature,
        "lm_cfg_scale": request.lm_cfg_scale,
        "lm_negative_prompt": request.lm_negative_prompt,
        "lm_top_p": request.lm_top_p,
        "lm_repetition_penalty": request.lm_repetition_penalty,
        "lm_top_k": request.lm_top_k or 0,
        "inference_steps": request.inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
    }


def sampling_from(params: Mapping[str, Any]) -> Sampling:
    """The LM sampling settings: top-k 0 and top-p >= 1 mean off."""
    top_k, top_p = params["lm_top_k"], params["lm_top_p"]
    return Sampling(
        temperature=float(params["lm_temperature"]),
        top_k=int(top_k) if top_k else None,
        top_p=float(top_p) if top_p and top_p < 1.0 else None,
        repetition_penalty=float(params["lm_repetition_penalty"]),
    )


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def known_duration(params: Mapping[str, Any], lm_metadata: Mapping[str, Any]) -> float | None:
    """The duration: the user's when positive (as given: an int stays an int), else the phase-1
    metadata's (as a float); None when neither is known. It is also phase 2's target."""
    if _positive(params["duration"]) is not None:
        return params["duration"]
    return _positive(lm_metadata.get("duration"))


def _has_codes(codes: str | Sequence[str]) -> bool:
    strings = [codes] if isinstance(codes, str) else list(codes)
    return any(text and text.strip() for text in strings)


# ---- phase 1: metadata -------------------------------------------------------------------------


def metadata_request(
    params: Mapping[str, Any], user_metadata: Mapping[str, Any], *, seed: int | None = None, limits: LMLimits = LMLimits()
) -> MetadataRequest:
    """Phase 1's request: the caption and lyrics prompt, the user's values forced in, no CFG."""
    caption, lyrics = params["caption"] or "", params["lyrics"] or ""
    return MetadataRequest(
        prompt=lm_prompts.phase1_prompt(caption, lyrics),
        unconditional_prompt=lm_prompts.phase1_unconditional_prompt(lyrics, params["lm_negative_prompt"]),
        cfg_scale=PHASE1_CFG_SCALE,
        max_new_tokens=lm_prompts.max_new_tokens(None, "cot", max_duration=limits.max_duration, max_model_len=limits.max_model_len),
        sampling=sampling_from(params),
        user_metadata=dict(user_metadata) or None,
        skip_caption=not params["use_cot_caption"],
        skip_language=not params["use_cot_language"],
        skip_genres=True,
        target_duration=None,
        max_duration=limits.max_duration,
        seed=seed,
    )


def _lm_text(value: Any, given: str) -> str:
    """The LM's keyscale/timesignature where the user gave none (an 'N/A' from the LM is not a value)."""
    if given or not value or value == dit_prompts.NOT_AVAILABLE:
        return given
    return value


def _merge(params: Mapping[str, Any], lm_metadata: Mapping[str, Any]) -> tuple[Any, str, str, float | None]:
    """The user's bpm, keyscale, timesignature and duration, the LM's filling the missing ones."""
    bpm = params["bpm"]
    if bpm is None and lm_metadata.get("bpm") and lm_metadata["bpm"] != dit_prompts.NOT_AVAILABLE:
        try:
            bpm = int(lm_metadata["bpm"])
        except (TypeError, ValueError):
            pass
    keyscale = _lm_text(lm_metadata.get("keyscale"), params["keyscale"] or "")
    timesignature = _lm_text(lm_metadata.get("timesignature"), params["timesignature"] or "")
    return bpm, keyscale, timesignature, known_duration(params, lm_metadata)


def fill_metadata(
    params: Mapping[str, Any], backend: LMBackend | None, *, seed: int | None = None, limits: LMLimits = LMLimits()
) -> MetadataFill:
    """Phase 1 alone: the LM fills whichever of bpm, keyscale, timesignature and duration the user
    left out; the user's values always win. No LM call when all four are given; without a backend
    the missing values stay missing (the documented defaults: N/A in the metas, 30 s of audio)."""
    params = resolve_params(params)
    if backend is None:
        return MetadataFill(*_merge(params, {}), lm_metadata=None)
    given = lm_prompts.user_metadata(params["bpm"], params["keyscale"], params["timesignature"], params["duration"])
    if lm_prompts.has_all_metas(given) or not params["use_cot_metas"]:
        if not given:
            # The reference fails here too ('NoneType' object has no attribute 'items').
            raise ValueError("use_cot_metas=false needs at least one of bpm, keyscale, timesignature, duration")
        return MetadataFill(*_merge(params, given), lm_metadata=dict(given))
    request = metadata_request(params, given, seed=seed, limits=limits)
    output = backend.generate_metadata(request)
    lm_metadata, _ = lm_prompts.parse_lm_output(output)
    return MetadataFill(*_merge(params, lm_metadata), lm_metadata=lm_metadata, request=request, output=output)


# ---- phase 2: audio codes ----------------------------------------------------------------------


def codes_requests(
    params: Mapping[str, Any],
    cot_block: str,
    target_duration: float,
    *,
    batch_size: int,
    seeds: Sequence[int] | None = None,
    limits: LMLimits = LMLimits(),
) -> list[CodesRequest]:
    """Phase 2's requests, one per batch item: the metadata block pre-filled, CFG at lm_cfg_scale
    against the empty block, exactly 5 codes a second of `target_duration`."""
    caption, lyrics = params["caption"] or "", params["lyrics"] or ""
    prompt = lm_prompts.phase2_prompt(caption, lyrics, cot_block)
    unconditional = lm_prompts.phase2_unconditional_prompt(caption, lyrics, params["lm_negative_prompt"])
    budget = lm_prompts.max_new_tokens(
        target_duration, "codes", max_duration=limits.max_duration, max_model_len=limits.max_model_len
    )
    return [
        CodesRequest(
            prompt=prompt,
            unconditional_prompt=unconditional,
            cfg_scale=float(params["lm_cfg_scale"]),
            n_codes=lm_prompts.eos_blocked_until_codes(target_duration),
            max_new_tokens=budget,
            sampling=sampling_from(params),
            seed=seeds[index] if seeds else None,
        )
        for index in range(batch_size)
    ]


# ---- the whole plan ----------------------------------------------------------------------------


def _lm_runs(params: Mapping[str, Any], backend: LMBackend | None) -> bool:
    """Whether the LM takes part: not for cover/repaint, else when thinking or any use_cot_* is on
    and a backend is loaded. Raises LMUnavailableError when thinking needs the missing LM."""
    wanted = params["task_type"] not in SKIP_LM_TASKS and (
        params["thinking"] or params["use_cot_caption"] or params["use_cot_language"] or params["use_cot_metas"]
    )
    if wanted and backend is None and params["thinking"]:
        raise LMUnavailableError("thinking=true needs the 5 Hz LM, and none is loaded")
    return wanted and backend is not None


def _generate_codes(
    params: Mapping[str, Any], backend: LMBackend, trace: LMTrace, *, batch_size: int, seeds: Sequence[int] | None, limits: LMLimits
) -> LMTrace:
    """Phase 2 for the whole batch in one backend call; the trace gains its requests and outputs."""
    metadata = trace.metadata or {}
    cot_block = lm_prompts.format_cot_block(metadata)
    target = known_duration(params, metadata) or FALLBACK_DURATION_S
    requests = tuple(codes_requests(params, cot_block, target, batch_size=batch_size, seeds=seeds, limits=limits))
    outputs = tuple(backend.generate_codes(list(requests)))
    if len(outputs) != batch_size:
        raise RuntimeError(f"the LM backend returned {len(outputs)} code strings for {batch_size} requests")
    return replace(trace, cot_block=cot_block, target_duration=target, codes_requests=requests, codes_outputs=outputs)


def _item_code_strings(codes: str | Sequence[str], batch_size: int) -> list[str]:
    if isinstance(codes, str):
        return [codes] * batch_size
    if len(codes) != batch_size:
        raise ValueError(f"audio_codes lists {len(codes)} strings for a batch of {batch_size}")
    return [text or "" for text in codes]


def _metas_seconds(params: Mapping[str, Any], duration: float | None, source_used: bool, src_seconds: float | None) -> float | None:
    """The duration the metas state: the source's length when the DiT reads the source; none for
    the other source tasks; else the requested or LM duration."""
    if source_used:
        if src_seconds is None:
            raise ValueError(f"task_type {params['task_type']} with src_audio needs src_audio_duration")
        return src_seconds
    if params["task_type"] in SOURCE_LENGTH_TASKS:
        return None
    return duration


def _generated_seconds(metas_seconds: float | None, duration: float | None, codes: list[int] | None,
                       cover: bool = False) -> float:
    """The seconds the DiT generates. Cover from audio codes: the codes' length (the reference sizes
    the latents by the hints; a requested duration or the source's length is not used)."""
    if cover and codes:
        return len(codes) / lm_prompts.CODES_PER_SECOND
    if metas_seconds is not None:
        return float(metas_seconds)
    if duration is not None:
        return float(duration)
    if codes:
        return len(codes) / lm_prompts.CODES_PER_SECOND
    return FALLBACK_DURATION_S


def _lm_stage(
    params: Mapping[str, Any], backend: LMBackend, *, batch_size: int, seeds: Sequence[int] | None, limits: LMLimits
) -> tuple[MetadataFill, LMTrace, str | list[str], str]:
    """Phase 1, then phase 2 when thinking and the request has no codes: the merged metadata, the
    trace, the codes for the DiT and the caption for the DiT (the LM's with use_cot_caption)."""
    fill = fill_metadata(params, backend, seed=seeds[0] if seeds else None, limits=limits)
    trace = LMTrace(invoked=True, metadata_request=fill.request, metadata_output=fill.output, metadata=fill.lm_metadata)
    codes = params["audio_codes"] or ""
    if params["thinking"] and not _has_codes(codes):
        trace = _generate_codes(params, backend, trace, batch_size=batch_size, seeds=seeds, limits=limits)
        codes = [lm_prompts.extract_audio_code_string(text) for text in trace.codes_outputs]
    lm_metadata = fill.lm_metadata or {}
    caption = params["caption"] or lm_metadata.get("caption") or ""
    if params["use_cot_caption"]:
        caption = lm_metadata.get("caption", caption)
    return fill, trace, codes, caption


def _dit_plan(
    params: Mapping[str, Any], fill: MetadataFill, trace: LMTrace, codes: str | list[str], caption: str,
    *, batch_size: int, src_audio_duration: float | None, is_lego_sft: bool = False,
) -> GenerationPlan:
    """The DiT side: effective task and instruction, metas, prompts and codes of every item."""
    task = params["task_type"]
    code_strings = _item_code_strings(codes, batch_size)
    has_codes = _has_codes(code_strings)
    switch_to_cover = task == "text2music" and has_codes
    instruction = dit_prompts.TASK_INSTRUCTIONS["cover"] if switch_to_cover else params["instruction"]
    source_used = task != "text2music" and bool(params["src_audio"]) and not has_codes
    metas_seconds = _metas_seconds(params, fill.duration, source_used, src_audio_duration)
    metas = dit_prompts.format_metas(fill.bpm, fill.keyscale, fill.timesignature, metas_seconds)

    dit_caption = dit_prompts.extract_sft_caption(caption)
    lego = {"is_lego_sft": is_lego_sft, "global_caption": params["global_caption"] or "",
            "chunk_mask_mode": params["chunk_mask_mode"]}
    caption_prompt = dit_prompts.caption_prompt(instruction, dit_prompts.dit_caption(dit_caption, instruction, **lego), metas)
    lyric_prompt = dit_prompts.lyric_prompt(params["lyrics"] or "", params["vocal_language"])
    non_cover = None
    if params["audio_cover_strength"] < 1.0:
        default = dit_prompts.DEFAULT_INSTRUCTION
        non_cover = dit_prompts.caption_prompt(default, dit_prompts.dit_caption(dit_caption, default, **lego), metas)
    items = tuple(
        PlanItem(caption_prompt, lyric_prompt, non_cover, text, lm_prompts.parse_audio_codes(text) if text.strip() else None)
        for text in code_strings
    )
    lm_metadata = fill.lm_metadata or {}
    return GenerationPlan(
        task_type="cover" if switch_to_cover else task,
        instruction=instruction,
        caption=dit_caption,
        lyrics=params["lyrics"] or "",
        vocal_language=params["vocal_language"],
        metas=metas,
        duration=_generated_seconds(metas_seconds, fill.duration, items[0].audio_codes, params["task_type"] == "cover"),
        metadata={
            "bpm": fill.bpm,
            "duration": fill.duration,
            "genres": lm_metadata.get("genres"),
            "keyscale": fill.keyscale,
            "timesignature": fill.timesignature,
            "language": lm_metadata.get("language"),
            "caption": caption,
        },
        items=items,
        lm=trace,
    )


def plan_generation(
    params: Mapping[str, Any],
    backend: LMBackend | None,
    *,
    batch_size: int = 1,
    src_audio_duration: float | None = None,
    seeds: Sequence[int] | None = None,
    limits: LMLimits = LMLimits(),
    is_lego_sft: bool = False,
) -> GenerationPlan:
    """Run the LM as the request asks (phase 1 once, phase 2 once per item in one backend call) and
    return the DiT's inputs. `src_audio_duration` is the source file's length in seconds (needed for
    non-text2music tasks with `src_audio`); `seeds` gives one seed per item (phase 1 uses the first);
    `is_lego_sft` is the DiT checkpoint's flag of that name (its caption block).

    Raises LMUnavailableError for thinking=true without a backend (unless the task skips the LM).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    params = resolve_params(params)
    if _lm_runs(params, backend):
        fill, trace, codes, caption = _lm_stage(params, backend, batch_size=batch_size, seeds=seeds, limits=limits)
    else:
        fill, trace = fill_metadata(params, None), LMTrace(invoked=False)
        codes, caption = params["audio_codes"] or "", params["caption"] or ""
    return _dit_plan(params, fill, trace, codes, caption, batch_size=batch_size, src_audio_duration=src_audio_duration,
                     is_lego_sft=is_lego_sft)
