"""The ACE-Step 1.5 pipeline the worker runs: a `GenerationRequest` in, stereo 48 kHz audio out.

`AceStepPipeline(components)` runs on parts already loaded (tests inject their own);
`AceStepPipeline.from_checkpoints(checkpoints, options)` loads them, and `load_pipeline(checkpoint_dir,
options)` is the worker's default factory (ACESTEP_PIPELINE). It reads no environment: the device,
the DiT, the LMs and their limits come in `PipelineOptions`. One request:

1. seeds (one per batch item; `seed_value` reports the ones used), the source audio when the task
   reads it (repaint/lego windows past either end pad it with zeros: out-painting);
2. the 5 Hz LM stage and every prompt string (`pipeline.lm.planner`): `thinking=true` writes the
   metadata block and the audio codes (the DiT then runs as cover from them), `thinking=false` only
   fills missing bpm/key/time signature/duration; the LM is skipped for cover and repaint;
3. text: caption prompt (instruction, caption, metas) through the Qwen3 text encoder; lyric prompt
   through its embedding table only;
4. audio inputs through the VAE: the source and the timbre reference (three 10 s slices of 30 s), or
   the checkpoint's silence latent; chunk masks, source latents and the repaint mask as the
   reference's handler builds them (`pipeline.conditioning`);
5. the DiT sampler (`pipeline.sampler`: the job's DiT, turbo or base/SFT, with the request's
   schedule, guidance, sampler and DCW options) from per-item seeded noise (retake: mixed with a
   second seeded noise);
6. latent shift/rescale, tiled VAE decode cropped to the requested samples, then upstream's
   post-processing (`pipeline.postprocess`): clipping guard, repaint waveform splice, peak
   normalisation to normalization_db, fades.

A worker may serve several DiTs (ACESTEP_DIT_MODELS beside ACESTEP_DIT_MODEL, sharing the VAE and
text encoder); a job runs the DiT its request names (`model`, set at submit).

Before step 2, `use_format`, `sample_mode` and `sample_query` run the LM's own tasks on the request
(`pipeline.lm.tasks.prepare_llm_inputs`): the caption and lyrics they write replace the request's,
and so do their metas except those the request gave (a deliberate difference: the reference lets a
sample's duration, bpm, key and time signature replace the user's). `run_lm_task` runs those tasks alone (format, create sample, understand) for the
synchronous routes. lego, extract and complete need a base DiT: another DiT fails the job saying so.

Documented choices where the reference is loose: a request without a duration (and no source
audio) gets 30 s, which is what its caption metas already say; a fixed seed s gives items s, s+1, ...
(the reference fixes only the first item); errors in the inputs are job errors with a clear message;
without an LM loaded, `thinking=true` fails the job saying so and missing metadata stays N/A."""

import logging
import secrets
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.audio_io import AudioError, load_audio
from pipeline.checkpoints import CheckpointError, Checkpoints, discover
from pipeline.contract import (
    BASE_MODEL_TASK_TYPES,
    BASE_MODELS,
    DURATION_MAX,
    MAX_SEED,
    SAMPLE_RATE,
    SOURCE_TASK_TYPES,
    STAGE_SPANS,
    GenerationRequest,
    PipelineOptions,
    batch_signature,
    dit_kind,
    stage_progress,
)
from pipeline.dit.load import load_dit, load_silence_latent
from pipeline.dit.model import AceStepDiT
from pipeline.dit_store import GIB, DitStore
from pipeline.interface import GeneratedAudio, OutOfMemory, PipelineError, Progress
from pipeline.lm.backend import CodesRequest, LMBackend, MetadataRequest, TextRequest, TokenReport
from pipeline.lm.loading import VllmEngines, load_lms, select_lm, vllm_available
from pipeline.lm.planner import GenerationPlan, LMLimits, LMUnavailableError, params_from_request, plan_generation
from pipeline.lm import tasks as lm_tasks
from pipeline.lm_batch import CodesBatcher
from pipeline.dit_batch import DecoderBarrier
from pipeline.rendezvous import each_in_a_thread
from pipeline import postprocess
from pipeline.lora import AdapterCache, AdapterError, job_adapters
from pipeline.conditioning import RANGE_TASKS, build_chunk_masks_and_src_latents
from pipeline.dcw import DCW
from pipeline.sampler import (
    Condition,
    Guidance,
    Sampling,
    merge_conditions,
    prepare_condition,
    retake_mix,
    sample,
    schedule_for,
)
from pipeline.text_encoder import TextEncoder
from pipeline.vae import Vae

log = logging.getLogger(__name__)

MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 1.0, float(DURATION_MAX)  # codes may make songs under DURATION_MIN
MIN_SOURCE_SECONDS = 1.0
TIMBRE_SECONDS, TIMBRE_SLICE_SECONDS = 30.0, 10.0
LM_INPUTS_SHARE = 0.3  # of the "lm" stage, for sample mode / format ahead of the plan's LM calls
METADATA_SHARE = 0.4  # of the plan's part of the "lm" stage, for the metadata call (codes: the rest)


def pick_device(name: str | None = None) -> tuple[torch.device, torch.dtype]:
    """`name` (cpu, cuda, cuda:1) or CUDA when present; bf16 on CUDA, float32 on CPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Components:
    """The loaded parts a pipeline runs on. `lms` maps LM folder names to pt backends; `engines`
    starts vllm engines for them on request (None: every LM request runs on pt)."""

    dit_name: str
    dit: AceStepDiT
    silence: torch.Tensor  # [1, T, C] the DiT's silence latent (repeated when a job needs more frames)
    vae: Vae
    text: TextEncoder
    device: torch.device
    dtype: torch.dtype
    lms: dict = field(default_factory=dict)
    default_lm: str | None = None
    engines: VllmEngines | None = None
    lm_limits: LMLimits = field(default_factory=LMLimits)
    # Other DiTs served: name -> (AceStepDiT, silence latent); or a DitStore of every DiT served (loaded
    # lazily under a memory budget), the default one included.
    extra_dits: Mapping = field(default_factory=dict)


class Stages:
    """The pipeline's progress calls: how far (0..1) it is within a stage, reported as the overall
    progress of `pipeline.contract.STAGE_SPANS`, so a poll's stage and progress always agree.
    `facts` go along as keywords (`audio_seconds`: the seconds per song, once known)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, stage: str, within: float = 0.0, **facts: Any) -> None:
        # capped at the span's end: lo + (hi - lo) x 1 may round past it, past the next stage's start
        self.progress(stage, min(stage_progress(stage, within), STAGE_SPANS[stage][1]), **facts)

    def steps(self, stage: str, lo: float = 0.0, hi: float = 1.0):
        """A `(done, total)` callback for a loop that runs the [lo, hi] part of `stage`."""
        return lambda done, total: self(stage, lo + (hi - lo) * done / max(total, 1))


class ReportingLM:
    """An LM backend whose calls report their tokens as the [lo, hi] part of the "lm" stage (a
    metadata call the first METADATA_SHARE of it, a codes call the rest, an LM task all of it).
    Every call starts with a report, so the stage begins when the LM does."""

    def __init__(self, lm: LMBackend, stages: Stages, lo: float = 0.0, hi: float = 1.0):
        self.lm, self.stages, self.lo, self.hi = lm, stages, lo, hi
        self.mid = lo + (hi - lo) * METADATA_SHARE

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def backend(self) -> str:
        return self.lm.backend  # read after the calls: "pt" when vllm had to fall back

    def _report(self, lo: float, hi: float) -> TokenReport:
        self.stages("lm", lo)
        return self.stages.steps("lm", lo, hi)

    def generate_metadata(self, request: MetadataRequest) -> str:
        return self.lm.generate_metadata(request, self._report(self.lo, self.mid))

    def generate_codes(self, requests: list[CodesRequest]) -> list[str]:
        return self.lm.generate_codes(requests, self._report(self.mid, self.hi))

    def generate_text(self, request: TextRequest) -> str:
        return self.lm.generate_text(request, self._report(self.lo, self.hi))


@dataclass
class Latents:
    """What the DiT generates from: the frames, the source and masks, cover or not, the codes."""

    frames: int
    samples: int
    src_latents: torch.Tensor  # [batch, frames, C]
    chunk_mask: torch.Tensor  # [batch, frames] bool (float32 with chunk_mask_mode auto_fixed)
    is_covers: torch.Tensor  # [batch] bool
    repaint_mask: torch.Tensor | None = None  # [batch, frames] bool: the frames regenerated
    clean_src: torch.Tensor | None = None  # [batch, frames, C] the unblanked source, for re-injection
    codes: torch.Tensor | None = None  # [batch, codes, 1]


@dataclass
class Source:
    """The source audio of a task that reads one: the waveform [2, S] at 48 kHz (padded for
    out-painting), its latents (None when silent) and the repaint/lego window in seconds of it."""

    audio: torch.Tensor
    latents: torch.Tensor | None
    start: float | None = None
    end: float | None = None


@dataclass
class EarlyPrep:
    """One job up to its LM stage (`AceStepPipeline.before_lm`)."""

    request: GenerationRequest  # after sample mode / format
    batch: int
    seeds: list[int]
    src: "Source | None"
    lm_inputs: Any  # lm_tasks.PreparedLlmInputs or None
    lego_sft: bool  # the job's DiT is a lego SFT model (read while it was in use)


@dataclass
class Prepared:
    """One job ready for the DiT's loop (`AceStepPipeline.prepare`)."""

    request: GenerationRequest  # after sample mode / format
    seeds: list[int]
    text: GenerationPlan
    lm: Any
    lm_inputs: Any  # lm_tasks.PreparedLlmInputs or None
    plan: Latents
    src: Source | None
    cover: Condition
    non_cover: Condition | None
    strength: float  # audio_cover_strength in effect (1 unless a cover item)
    noise: torch.Tensor  # x_T [items, frames, C], retake mixed in


class AceStepPipeline:
    def __init__(self, components: Components):
        self.components = parts = components
        self.dit_name, self.dit, self.silence = parts.dit_name, parts.dit, parts.silence
        self.vae, self.text, self.device, self.dtype = parts.vae, parts.text, parts.device, parts.dtype
        self.lms, self.default_lm, self.engines, self.lm_limits = parts.lms, parts.default_lm, parts.engines, parts.lm_limits
        if isinstance(parts.extra_dits, DitStore):  # every DiT served, the default among them; checked as loaded
            self.dits = parts.extra_dits
        else:
            self.dits = {parts.dit_name: (parts.dit, parts.silence), **parts.extra_dits}
            for name, (dit, _silence) in self.dits.items():
                check_vae_width(self.vae, name, dit)
        self.models = [*self.dits, *sorted(self.lms)]  # reported to the workers table
        self.adapters = AdapterCache()  # LoRA/LoKr adapters loaded onto the DiTs (least recently used evicted)
        self.lm_code_passes: list[int] = []  # rows of each merged LM codes pass of the last run_batch
        self.dit_passes: list[int] = []  # rows of each merged decoder call of jobs of several lengths

    @contextmanager
    def using(self, name: str):
        """Run with the DiT `name` (one this worker serves; the default DiT again afterwards)."""
        if name not in self.dits:
            raise PipelineError(f"the job asks for the DiT {name}; this worker serves {', '.join(self.dits)}")
        default = self.dit_name, self.dit, self.silence
        self.dit_name = name
        self.dit, self.silence = self.dits[name]
        try:
            yield
        finally:
            self.dit_name, self.dit, self.silence = default

    @classmethod
    def from_checkpoints(cls, checkpoints: Checkpoints, options: PipelineOptions = PipelineOptions()) -> "AceStepPipeline":
        """Load what `options` name from `checkpoints`; a name the checkpoints lack is an error that
        names its ACESTEP_* variable and what is there."""
        device, dtype = pick_device(options.device)
        folders = {}
        for name in dict.fromkeys((options.dit_model, *options.dit_models)):
            variable = options.variables["dit_model" if name == options.dit_model else "dit_models"]
            if name not in checkpoints.dits and name not in checkpoints.incomplete:
                raise PipelineError(f"{variable}={name}: no such DiT in {checkpoints.root} "
                                    f"(there: {', '.join(sorted(checkpoints.dits)) or 'none'})")
            try:
                folders[name] = checkpoints.dit(name).path
            except CheckpointError as exc:  # its folder is incomplete: the missing files, named
                raise PipelineError(f"{variable}={name}: {exc}") from None
        for name in (*options.lm_models, *([options.lm_model] if options.lm_model else [])):
            if name not in checkpoints.lms:
                variable = options.variables["lm_model" if name == options.lm_model else "lm_models"]
                raise PipelineError(f"{variable}: no 5 Hz LM {name} in {checkpoints.root} "
                                    f"(there: {', '.join(sorted(checkpoints.lms)) or 'none'})")
        vae = Vae.load(checkpoints.vae.path, device=device, dtype=dtype)
        lms = load_lms(checkpoints, options.lm_models, device=device, dtype=dtype)
        engines = VllmEngines(options.vllm_gpu_memory_utilization) if options.vllm else None
        if engines is not None and device.type == "cuda" and vllm_available():
            for lm in lms.values():  # engines start with the worker, not inside its first job
                engines.backend(lm)
        def load(name: str, folder: Path) -> tuple[AceStepDiT, torch.Tensor]:
            dit = load_dit(folder, device=device, dtype=dtype)
            check_vae_width(vae, name, dit)
            return dit, load_silence_latent(folder, device=device, dtype=dtype)

        budget = options.dit_memory_budget_gb
        dits = DitStore(folders, load, pinned=options.dit_model, dtype=dtype,
                        budget_bytes=None if budget is None else int(budget * GIB))
        dit, silence = dits[options.dit_model]
        return cls(Components(
            dit_name=options.dit_model, dit=dit, silence=silence, extra_dits=dits,
            vae=vae,
            text=TextEncoder.load(checkpoints.text_encoder.path, device=device, dtype=dtype),
            device=device, dtype=dtype, lms=lms, default_lm=options.lm_model, engines=engines,
            # The longest song the LM may plan (the reference caps it by GPU memory tier).
            lm_limits=LMLimits(max_duration=options.lm_max_duration),
        ))

    # ---- planning -------------------------------------------------------------------------------

    def seeds(self, request: GenerationRequest, batch: int) -> list[int]:
        """Random unless use_random_seed is false; a fixed seed s gives s, s+1, ...; a list gives
        its seeds in order (-1: random), items beyond it continue from its last seed."""
        given = request.seed if isinstance(request.seed, list) else [request.seed]
        if request.use_random_seed or given == [-1]:
            return [secrets.randbelow(MAX_SEED + 1) for _ in range(batch)]
        seeds = [s if s >= 0 else secrets.randbelow(MAX_SEED + 1) for s in given[:batch]]
        return seeds + [(seeds[-1] + i) % (MAX_SEED + 1) for i in range(1, batch - len(seeds) + 1)]

    def silence_frames(self, frames: int) -> torch.Tensor:
        """The first `frames` frames of the silence latent, repeated when it is shorter."""
        silence = self.silence
        if silence.shape[1] < frames:
            silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
        return silence[:, :frames]

    def encode_file(self, path: str, what: str, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
        """Audio file -> (latents [1, T, C], samples at 48 kHz); at most `max_seconds` of it decoded."""
        audio = read_audio(path, what, max_seconds)
        return self.vae.encode(torch.from_numpy(audio)[None].to(self.device, self.dtype)), audio.shape[1]

    def timbre_latents(self, path: str | None, seeds: list[int]) -> torch.Tensor:
        """[batch, timbre frames, C]: the reference audio as three random 10 s slices (one from each
        third, drawn with the item's seed) making 30 s, VAE-encoded; else (no reference, or a silent
        one, which the reference's handler refuses to use) the silence latent."""
        frames = self.dit.config.timbre_fix_frame
        audio = None if path is None else read_audio(path, "reference audio")
        if audio is None or postprocess.is_silence(torch.from_numpy(audio)):
            return self.silence_frames(frames).expand(len(seeds), -1, -1)
        total, piece = int(TIMBRE_SECONDS * SAMPLE_RATE), int(TIMBRE_SLICE_SECONDS * SAMPLE_RATE)
        if audio.shape[1] < total:
            audio = np.tile(audio, (1, -(-total // audio.shape[1])))
        third = audio.shape[1] // 3
        items = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            starts = [k * third + int(rng.integers(0, max(third - piece, 0) + 1)) for k in range(3)]
            items.append(np.concatenate([audio[:, s:s + piece] for s in starts], axis=1))
        latents = self.vae.encode(torch.from_numpy(np.stack(items)).to(self.device, self.dtype))
        return fit_frames(latents, frames, self.silence_frames(frames))

    def source(self, request: GenerationRequest) -> Source | None:
        """The source audio, for the tasks that read it (the worker has made `src_audio_path` a
        local file): at most 600 s decoded; for repaint and lego a window past either end pads the
        waveform with zeros and shifts the window (out-painting, as the reference's padding step);
        VAE-encoded unless silent (a silent source counts as no audio)."""
        task = request.task_type
        if task not in SOURCE_TASK_TYPES:
            return None
        if not request.src_audio_path:
            raise PipelineError(f"{task} needs source audio (src_audio_path or an uploaded src_audio)")
        # No task reads past the longest song a job may make: the rest is never decoded or encoded
        # (a long or bomb-like source costs what a 600 s one does).
        audio = torch.from_numpy(read_audio(request.src_audio_path, "source audio", MAX_DURATION_SECONDS))
        if audio.shape[1] < MIN_SOURCE_SECONDS * SAMPLE_RATE:
            raise PipelineError(f"source audio is {audio.shape[1] / SAMPLE_RATE:.2f} s long; "
                                f"at least {MIN_SOURCE_SECONDS:g} s is needed")
        start, end = None, None
        if task in RANGE_TASKS:
            seconds = audio.shape[1] / SAMPLE_RATE
            start = float(request.repainting_start)
            end = seconds if request.repainting_end is None or request.repainting_end < 0 else float(request.repainting_end)
            if end <= start or start >= seconds or end <= 0:
                raise PipelineError(f"repaint window [{start:g}, {end:g}] s must overlap the {seconds:.2f} s of "
                                    "source audio (it may extend past either end to out-paint)")
            padded, starts, ends = postprocess.padding_info(1, audio, start, end)
            audio, start, end = padded[0], starts[0], ends[0]
            if audio.shape[1] > MAX_DURATION_SECONDS * SAMPLE_RATE:
                raise PipelineError(f"repaint result would be {audio.shape[1] / SAMPLE_RATE:.1f} s; "
                                    f"at most {MAX_DURATION_SECONDS:g} s")
        silent = postprocess.is_silence(audio)
        latents = None if silent else self.vae.encode(audio[None].to(self.device, self.dtype))
        return Source(audio, latents, start, end)

    def text_plan(self, request: GenerationRequest, batch: int, seeds: list[int], src_samples: int,
                  stages: Stages, lm_from: float = 0.0, *, lego_sft: bool | None = None,
                  wrap=None) -> tuple[GenerationPlan, Any]:
        """The LM stage (when the request asks for it; its calls report from `lm_from` of the "lm"
        stage on) and every string the DiT's text side reads; with the LM backend that was
        available to it (None without an LM). `lego_sft`: the job's DiT is a lego SFT model (default:
        the DiT in use); `wrap`: what the LM backend is wrapped in."""
        params = params_from_request(request)
        if lego_sft is None:
            lego_sft = bool(getattr(self.dit.config, "is_lego_sft", False))
        lm = None
        if self.lms:
            lm = select_lm(self.lms, request.lm_model_path or self.default_lm, request.lm_backend, self.engines)
            if wrap is not None:
                lm = wrap(lm)
            lm = ReportingLM(lm, stages, lm_from)
        try:
            plan = plan_generation(params, lm, batch_size=batch, seeds=seeds, limits=self.lm_limits,
                                   src_audio_duration=src_samples / SAMPLE_RATE if src_samples else None,
                                   is_lego_sft=lego_sft)
        except LMUnavailableError:
            raise PipelineError("thinking=true needs a 5 Hz LM, and this worker has none loaded") from None
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        return plan, lm

    def latents(self, request: GenerationRequest, text: GenerationPlan, src: Source | None, batch: int) -> Latents:
        """Frames and the DiT's conditioning inputs, built as the reference's handler builds them
        (`pipeline.conditioning`): chunk masks, source latents, cover flags, the repaint mask."""
        codes = [item.audio_codes for item in text.items]
        if any(codes) and not all(codes):
            raise PipelineError("audio_code_string must give codes for every item of the batch or for none")
        if any(codes) and len({len(c) for c in codes}) != 1:
            raise PipelineError("every audio_code_string of a batch must hold the same number of codes")
        task = text.task_type
        if task in RANGE_TASKS and any(codes):
            raise PipelineError(f"audio_code_string cannot be combined with task_type {task}")
        if task in RANGE_TASKS:  # the (padded) source's length
            samples = src.audio.shape[1]
            seconds = samples / SAMPLE_RATE
        else:
            seconds = text.duration
            samples = round(seconds * SAMPLE_RATE)
        if not MIN_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
            raise PipelineError(f"audio_duration must be within {MIN_DURATION_SECONDS:g}-{MAX_DURATION_SECONDS:g} s")
        frames = -(-samples // self.vae.hop_length)
        silence = self.silence_frames(frames)
        target = None
        if src is not None and src.latents is not None:
            target = fit_frames(src.latents, frames, silence).expand(batch, -1, -1)
        mode = request.chunk_mask_mode
        chunk, _spans, is_covers, src_latents, repaint_mask = build_chunk_masks_and_src_latents(
            None if src is None else [src.audio] * batch, target, silence[0],
            batch_size=batch, max_latent_length=frames, task_type=task,
            repainting_start=None if src is None else src.start, repainting_end=None if src is None else src.end,
            chunk_mask_modes="auto" if mode == "auto_fixed" else mode, auto_sentinel=mode == "auto_fixed",
        )
        code_tensor = None
        if all(codes):
            needed = -(-frames // self.dit.config.pool_window_size)
            if len(codes[0]) < needed:
                raise PipelineError(f"audio_code_string holds {len(codes[0])} codes; {needed} (5 per second) "
                                    f"are needed for {seconds:g} s")
            code_tensor = torch.tensor(codes, device=self.device, dtype=torch.long)[..., None]
        clean = target if repaint_mask is not None else None
        if repaint_mask is not None and clean is None:  # a silent source: the clean source is silence
            clean = silence.expand(batch, -1, -1)
        return Latents(frames, samples, src_latents, chunk, is_covers, repaint_mask, clean, code_tensor)

    # ---- running --------------------------------------------------------------------------------

    def run(self, request: GenerationRequest, progress: Progress) -> GeneratedAudio:
        batch = request.items
        try:
            with torch.inference_mode(), self.using(request.model or self.dit_name):
                return self._run(request, batch, progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory on {self.device}: {exc}") from None

    def noise(self, seeds: list[int], frames: int) -> torch.Tensor:
        """x_T: per item from a generator seeded with the item's seed, as the reference draws it."""
        return torch.cat([
            torch.randn((1, frames, self.silence.shape[2]), generator=torch.Generator(self.device).manual_seed(s),
                        device=self.device, dtype=self.dtype)
            for s in seeds
        ])

    def retake_seeds(self, request: GenerationRequest, batch: int) -> list[int]:
        """The retake noise's seeds: like `seeds`, from retake_seed (random when absent or -1)."""
        given = request.retake_seed
        fixed = request.model_copy(update={"seed": -1 if given is None else given, "use_random_seed": given in (None, -1)})
        return self.seeds(fixed, batch)

    def sampler_settings(self, request: GenerationRequest) -> tuple[Guidance | None, Sampling]:
        """The request's guidance (base/SFT models only; turbo ignores it) and step options."""
        guidance = None
        if not self.dit.config.turbo:
            guidance = Guidance(scale=request.guidance_scale, use_adg=request.use_adg,
                                interval_start=request.cfg_interval_start, interval_end=request.cfg_interval_end)
        dcw = None
        if request.dcw_enabled:
            dcw = DCW(mode=request.dcw_mode, scaler=request.dcw_scaler, high_scaler=request.dcw_high_scaler,
                      wavelet=request.dcw_wavelet)
        sampling = Sampling(infer_method=request.infer_method, sampler_mode=request.sampler_mode,
                            velocity_norm_threshold=request.velocity_norm_threshold,
                            velocity_ema_factor=request.velocity_ema_factor, dcw=dcw)
        return guidance, sampling

    def source_codes(self, path: str) -> str:
        """A source file's 5 Hz codes as `<|audio_code_N|>` tokens: VAE-encoded, then the DiT's own
        tokenizer (attention pooling to 5 Hz, FSQ) as the reference's `convert_src_audio_to_codes`."""
        audio = torch.from_numpy(read_audio(path, "source audio", MAX_DURATION_SECONDS))
        if postprocess.is_silence(audio):
            raise PipelineError("source audio is silent: there are no codes to extract")
        latents = self.vae.encode(audio[None].to(self.device, self.dtype))
        mask = torch.ones(latents.shape[:2], dtype=latents.dtype, device=self.device)
        _quantized, indices, _pooled = self.dit.tokenize(latents, self.silence_frames(self.dit.config.pool_window_size), mask)
        return "".join(f"<|audio_code_{int(code)}|>" for code in indices[0, :, 0].tolist())

    def analyse(self, request: GenerationRequest, seeds: list[int], stages: Stages) -> GeneratedAudio:
        """The analysis modes, which answer with text instead of audio: extract_codes_only (the
        source's codes), full_analysis_only (those codes through the LM's understanding: caption,
        lyrics, bpm, key, ...), analysis_only (the LM's metadata for the caption and lyrics)."""
        if request.extract_codes_only or request.full_analysis_only:
            stages("preparing", 0.5)
            codes = self.source_codes(request.src_audio_path)
            if request.extract_codes_only:
                return GeneratedAudio([], SAMPLE_RATE, {"audio_codes": codes, "status_message": "Audio Codes Extraction Success",
                                                         "generation_info": f"{self.dit_name}: source codes"})
            lm = self.lm_for(request.lm_model_path, request.lm_backend)
            if lm is None:
                raise PipelineError("full_analysis_only needs a 5 Hz LM, and this worker has none loaded")
            stages("lm")
            result = lm_tasks.understand_music(ReportingLM(lm, stages), codes, temperature=0.3, seed=seeds[0])
            if not result.success:
                raise PipelineError(f"the LM could not analyse the source: {result.error or result.status_message}")
            metas = {k: v for k, v in result.to_dict().items() if k not in ("status_message", "success", "error") and v}
            return GeneratedAudio([], SAMPLE_RATE, {
                "bpm": result.bpm, "keyscale": result.keyscale or None, "timesignature": result.timesignature or None,
                "duration": result.duration, "caption": result.caption, "lyrics": result.lyrics,
                "language": result.language or "unknown", "metas": metas, "lm_model": lm.name, "lm_backend": lm.backend,
                "status_message": "Full Hardware Analysis Success", "generation_info": f"{lm.name}: source analysis",
            })
        if not self.lms:
            raise PipelineError("analysis_only needs a 5 Hz LM, and this worker has none loaded")
        text, lm = self.text_plan(request.model_copy(update={"thinking": False}), 1, seeds[:1], 0, stages)
        meta = text.metadata
        return GeneratedAudio([], SAMPLE_RATE, {
            "bpm": meta.get("bpm"), "keyscale": meta.get("keyscale"), "timesignature": meta.get("timesignature"),
            "duration": meta.get("duration"), "caption": meta.get("caption") or request.caption, "lyrics": request.lyrics,
            "metas": {k: v for k, v in meta.items() if v not in (None, "")}, "lm_model": lm.name, "lm_backend": lm.backend,
            "status_message": "Success", "generation_info": "Analysis Only Mode Complete",
        })

    def _run(self, request: GenerationRequest, batch: int, progress: Progress) -> GeneratedAudio:
        stages = Stages(progress)
        if request.extract_codes_only or request.full_analysis_only or request.analysis_only:
            return self.analyse(request, self.seeds(request, 1), stages)
        with self.adapted(request):
            job = self.prepare(request, batch, stages)
            return self.finish([job], self.sample_jobs([job], stages), stages)[0]

    @contextmanager
    def adapted(self, request: GenerationRequest):
        """The job's DiT with exactly its LoRA/LoKr adapters active (the worker has set each one's
        local `path`); an adapter that cannot load fails the job, naming it."""
        try:
            with self.adapters.activate(self.dit, job_adapters(request.lora)):
                yield
        except AdapterError as exc:
            raise PipelineError(f"lora: {exc}") from None

    def run_batch(self, requests: list[GenerationRequest], progress: Progress) -> list[GeneratedAudio | PipelineError]:
        """Jobs sharing one GPU pass: each is prepared on its own (its seeds, LM plan, inputs and
        conditions; a job whose input fails gets its PipelineError in its place and the others go on),
        then jobs that agree on `batch_signature` and on their frame count run as one DiT batch (each
        item seeing only its own condition: `merge_conditions`) and one VAE decode, and each job is
        post-processed on its own. The result equals running each job alone, up to floating-point
        rounding. Jobs of other lengths or settings form their own batches in the same call."""
        stages = Stages(progress)
        results: list[GeneratedAudio | PipelineError | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, Prepared]]] = {}
        try:
            with torch.inference_mode():
                early: dict[int, EarlyPrep] = {}
                for index, request in enumerate(requests):
                    if request.extract_codes_only or request.full_analysis_only or request.analysis_only:
                        results[index] = self._isolated(lambda r=request: self.run(r, progress))
                        continue
                    made = self._isolated(lambda r=request: self._with_dit(r, lambda: self.before_lm(r, r.items, stages)))
                    if isinstance(made, PipelineError):
                        results[index] = made
                    else:
                        early[index] = made
                planned = self.plan_texts(early, stages)
                for index, job_early in early.items():
                    if isinstance(planned[index], PipelineError):
                        results[index] = planned[index]
                        continue
                    request = job_early.request
                    job = self._isolated(lambda r=request, e=job_early, p=planned[index]: self._with_dit(
                        r, lambda: self.after_lm(e, *p, stages)))
                    if isinstance(job, PipelineError):
                        results[index] = job
                        continue
                    key = (batch_signature(job.request), job.request.model or self.dit_name)
                    groups.setdefault(key, []).append((index, job))
                for key, members in groups.items():
                    by_frames: dict[int, list[tuple[int, Prepared]]] = {}
                    for index, job in members:
                        by_frames.setdefault(job.plan.frames, []).append((index, job))
                    lengths = list(by_frames.values())
                    with self.using(key[1]):
                        try:
                            with self.adapted(members[0][1].request):  # one set of adapters: part of the signature
                                latents = self.sample_groups([[job for _, job in group] for group in lengths], stages)
                            made = [result for group, group_latents in zip(lengths, latents, strict=True)
                                    for result in self.finish([job for _, job in group], group_latents, stages)]
                        except PipelineError as exc:  # the shared pass failed: every job of it
                            made = [exc] * len(members)
                    for (index, _), result in zip([m for group in lengths for m in group], made, strict=True):
                        results[index] = result
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory on {self.device}: {exc}") from None
        return results

    @staticmethod
    def _isolated(call):
        """`call()`, or the PipelineError it raised (a fault of this job's input, kept to this job)."""
        try:
            return call()
        except PipelineError as exc:
            return exc

    def _with_dit(self, request: GenerationRequest, call):
        """`call()` with the job's DiT in use and its adapters active."""
        with self.using(request.model or self.dit_name), self.adapted(request):
            return call()

    def plan_texts(self, early: dict[int, "EarlyPrep"], stages: Stages) -> dict[int, Any]:
        """Each job's LM stage: (plan, lm), or its PipelineError. With several jobs, each plans in a
        thread of its own and their audio-code calls run as one LM pass per backend and cfg_scale
        (`pipeline.lm_batch`); the DiT is not touched meanwhile."""
        if len(early) < 2 or not self.lms:
            return {index: self._isolated(lambda e=job: self.plan_text(e, stages)) for index, job in early.items()}
        batcher = CodesBatcher(len(early))
        made = each_in_a_thread(list(early.values()), lambda job: self._isolated(
            lambda: self.plan_text(job, stages, wrap=batcher.wrap)), batcher)
        planned = dict(zip(early, made, strict=True))
        self.lm_code_passes = list(batcher.calls)
        return planned

    def prepare(self, request: GenerationRequest, batch: int, stages: Stages) -> "Prepared":
        """Everything before the DiT's loop for one job: seeds, source, the LM stage and prompts,
        latents and masks, text and timbre encodings, the conditions, x_T (retake mixed in)."""
        early = self.before_lm(request, batch, stages)
        return self.after_lm(early, *self.plan_text(early, stages), stages)

    def before_lm(self, request: GenerationRequest, batch: int, stages: Stages) -> "EarlyPrep":
        """A job up to its LM stage: seeds, source, the LM's own inputs (sample mode, format)."""
        self.check_task_type(request.task_type)
        stages("preparing")
        seeds = self.seeds(request, batch)
        src = self.source(request)
        request, prepared = self.apply_lm_inputs(request, seeds[0], stages)
        return EarlyPrep(request, batch, seeds, src, prepared, bool(getattr(self.dit.config, "is_lego_sft", False)))

    def plan_text(self, early: "EarlyPrep", stages: Stages, wrap=None) -> tuple[GenerationPlan, Any]:
        """The job's LM stage (`wrap`: what its LM backend is wrapped in, e.g. a CodesBatcher's)."""
        src_samples = 0 if early.src is None else early.src.audio.shape[1]
        return self.text_plan(early.request, early.batch, early.seeds, src_samples, stages,
                              LM_INPUTS_SHARE if early.lm_inputs else 0.0, lego_sft=early.lego_sft, wrap=wrap)

    def after_lm(self, early: "EarlyPrep", text: GenerationPlan, lm: Any, stages: Stages) -> "Prepared":
        """The rest of `prepare`, from the LM's plan on."""
        request, batch, seeds, src, prepared = early.request, early.batch, early.seeds, early.src, early.lm_inputs
        plan = self.latents(request, text, src, batch)
        stages("conditioning", audio_seconds=plan.samples / SAMPLE_RATE)
        captions, captions_mask = self.text.encode_text([item.caption_prompt for item in text.items])
        lyrics, lyric_mask = self.text.embed_lyrics([item.lyric_prompt for item in text.items])
        shared = dict(
            lyric_hidden_states=lyrics, lyric_attention_mask=lyric_mask,
            refer_audio_acoustic_hidden_states_packed=self.timbre_latents(request.reference_audio_path, seeds),
            refer_audio_order_mask=torch.arange(batch, device=self.device),
            silence_latent=self.silence_frames(max(plan.frames, self.dit.config.pool_window_size)),
            chunk_masks=plan.chunk_mask[..., None].expand(-1, -1, self.silence.shape[2]),
        )
        cover = prepare_condition(self.dit, text_hidden_states=captions, text_attention_mask=captions_mask,
                                  src_latents=plan.src_latents, is_covers=plan.is_covers, audio_codes=plan.codes, **shared)
        strength = request.audio_cover_strength if bool(plan.is_covers.any()) else 1.0
        non_cover = None
        if strength < 1.0:  # the later steps: the non-cover caption, silence as source, no cover items
            texts, masks = self.text.encode_text([item.non_cover_caption_prompt for item in text.items])
            silence = shared["silence_latent"][:, :plan.frames].expand(batch, -1, -1)
            non_cover = prepare_condition(self.dit, text_hidden_states=texts, text_attention_mask=masks, src_latents=silence,
                                          is_covers=torch.zeros_like(plan.is_covers), **shared)
        retake = self.noise(self.retake_seeds(request, batch), plan.frames) if request.retake_variance > 0 else None
        return Prepared(request=request, seeds=seeds, text=text, lm=lm, lm_inputs=prepared, plan=plan, src=src,
                        cover=cover, non_cover=non_cover, strength=strength,
                        noise=retake_mix(self.noise(seeds, plan.frames), retake, request.retake_variance))

    def sample_groups(self, groups: list[list["Prepared"]], stages: Stages) -> list[list[torch.Tensor]]:
        """`sample_jobs` for groups of jobs that agree on `batch_signature` but not on their frames:
        one group alone as it is; several, each in a thread of its own whose decoder calls are merged
        into one per step (`pipeline.dit_batch`). The first group reports the progress."""
        if len(groups) == 1:
            return [self.sample_jobs(groups[0], stages)]
        barrier = DecoderBarrier(self.dit.decoder, len(groups))
        model = barrier.model(self.dit)
        quiet = Stages(_no_progress)
        latents = each_in_a_thread(list(enumerate(groups)), lambda item: self.sample_jobs(
            item[1], stages if item[0] == 0 else quiet, model=model), barrier)
        self.dit_passes = list(barrier.calls)
        return latents

    def sample_jobs(self, jobs: list["Prepared"], stages: Stages, model=None) -> list[torch.Tensor]:
        """One DiT loop for jobs that agree on `batch_signature` and on their frames: x0 latents per job."""
        first = jobs[0].request
        base = not self.dit.config.turbo
        schedule, cover_steps = schedule_for(base, first.inference_steps, first.shift, first.timesteps, jobs[0].strength)
        injection_ratio, crossfade_frames, _ = postprocess.repaint_config(first.repaint_mode, first.repaint_strength)
        guidance, sampling = self.sampler_settings(first)
        repainting = any(job.plan.repaint_mask is not None for job in jobs)
        cat = lambda tensors: torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # noqa: E731
        clean = mask = None
        if repainting:  # items without a window: all regenerated, never re-injected
            mask = cat([job.plan.repaint_mask if job.plan.repaint_mask is not None
                        else torch.ones(job.noise.shape[:2], dtype=torch.bool, device=self.device) for job in jobs])
            clean = cat([job.plan.clean_src if job.plan.clean_src is not None else job.plan.src_latents for job in jobs])
        non_covers = [job.non_cover for job in jobs]
        stages("dit")
        latents = sample(
            model if model is not None else self.dit, merge_conditions([job.cover for job in jobs]), cat([job.noise for job in jobs]),
            timesteps=schedule, base=base,
            non_cover=merge_conditions(non_covers) if all(c is not None for c in non_covers) else None,
            cover_steps=cover_steps, audio_cover_strength=jobs[0].strength,
            cover_noise_strength=first.cover_noise_strength, src_latents=cat([job.plan.src_latents for job in jobs]),
            repaint_mask=mask, clean_src_latents=clean, repaint_crossfade_frames=crossfade_frames,
            repaint_injection_ratio=injection_ratio, guidance=guidance, sampling=sampling,
            generator=[(torch.Generator(self.device).manual_seed(job.seeds[0]), job.noise.shape[0]) for job in jobs],
            progress=stages.steps("dit"),
        )
        return list(latents.split([job.noise.shape[0] for job in jobs]))

    def decode(self, latents: torch.Tensor, stages: Stages) -> torch.Tensor:
        """The VAE decode of [B, T, C] latents: all items at once on a GPU; on a CPU item by item
        (one wide batch of waveform-rate activations runs slower there than the items one at a time:
        run_batch of 8 tiny 10 s songs took 5.6 s with one decode call, 2.2 s for the 8 songs one by
        one, most of the difference in the decode)."""
        if self.device.type != "cpu" or latents.shape[0] == 1:
            return self.vae.decode(latents, progress=stages.steps("vae"))
        items = latents.shape[0]
        return torch.cat([self.vae.decode(latents[i:i + 1], progress=stages.steps("vae", i / items, (i + 1) / items))
                          for i in range(items)])

    def finish(self, jobs: list["Prepared"], latents: list[torch.Tensor], stages: Stages) -> list[GeneratedAudio]:
        """Latent shift/rescale, one VAE decode for the jobs (equal frames), then each job's own
        post-processing (clipping guard, repaint splice, normalisation, fades) and result info."""
        try:
            latents = [postprocess.postprocess_latents(x, job.request.latent_shift, job.request.latent_rescale)
                       for job, x in zip(jobs, latents, strict=True)]
        except RuntimeError as exc:
            raise PipelineError(f"the DiT's output cannot be decoded: {exc}") from None
        stages("vae")
        decoded = self.decode(torch.cat(latents) if len(latents) > 1 else latents[0], stages)
        made = []
        for job, wavs in zip(jobs, decoded.split([x.shape[0] for x in latents]), strict=True):
            request, plan, src, items = job.request, job.plan, job.src, job.noise.shape[0]
            wavs = wavs[:, :, : plan.samples].float()
            splice = None
            if plan.repaint_mask is not None and request.repaint_mode != "aggressive":
                wav_crossfade = postprocess.repaint_config(request.repaint_mode, request.repaint_strength)[2]
                source = src.audio.to(wavs.device, wavs.dtype).expand(items, -1, -1)
                splice = (source, [src.start] * items, [src.end] * items, wav_crossfade)
            wavs = postprocess.postprocess_audio(
                wavs, repaint=splice, normalize=request.enable_normalization, normalization_db=request.normalization_db,
                fade_in=request.fade_in_duration, fade_out=request.fade_out_duration,
            )
            info = self.result_info(job.text, plan, job.seeds, job.lm)
            if job.lm_inputs is not None:
                info = self.lm_inputs_info(info, request, job.lm_inputs)
            made.append(GeneratedAudio(list(wavs.cpu().numpy()), SAMPLE_RATE, info))
        return made

    # ---- the LM's own tasks -----------------------------------------------------------------------

    def is_base_model(self) -> bool:
        """Whether the job's DiT is a base model (acestep-v15-base, acestep-v15-xl-base, ...): by its
        name, else by its config (a folder named otherwise)."""
        try:
            return dit_kind(self.dit_name) == "base"
        except ValueError:
            return not self.dit.config.turbo and self.dit.config.model_version == "base"

    def check_task_type(self, task_type: str) -> None:
        """lego, extract and complete were trained only into the base DiT."""
        if task_type in BASE_MODEL_TASK_TYPES and not self.is_base_model():
            raise PipelineError(f"task_type {task_type} needs a base model ({', '.join(BASE_MODELS)}); "
                                f"the job runs {self.dit_name}")

    def lm_for(self, name: str | None, backend: str | None) -> Any:
        """The LM a request or task names (else the default), None when this worker has none."""
        if not self.lms:
            return None
        return select_lm(self.lms, name or self.default_lm, backend or "vllm", self.engines)

    def apply_lm_inputs(self, request: GenerationRequest, seed: int,
                        stages: Stages) -> tuple[GenerationRequest, lm_tasks.PreparedLlmInputs | None]:
        """sample_mode / sample_query / use_format, as the reference's API applies them: the LM's
        caption, lyrics, bpm, key, time signature and duration replace the request's (the request's
        vocal_language stays); use_cot_* are turned off without an LM. The request unchanged (and
        None) when none of the three is asked for. Its LM calls report the first LM_INPUTS_SHARE of
        the "lm" stage."""
        fields = lm_tasks.lm_input_fields(request)
        if not lm_tasks.uses_lm_inputs(fields):
            return request, None
        stages("lm")
        lm = self.lm_for(request.lm_model_path, request.lm_backend)
        if lm is not None:
            lm = ReportingLM(lm, stages, 0.0, LM_INPUTS_SHARE)
        try:
            prepared = lm_tasks.prepare_llm_inputs(fields, lm, seed=seed, max_duration=self.lm_limits.max_duration)
        except lm_tasks.LMUnavailableError as exc:
            raise PipelineError(str(exc)) from None
        except (RuntimeError, ValueError) as exc:
            raise PipelineError(f"the 5 Hz LM could not prepare the request: {exc}") from None
        duration = prepared.audio_duration
        update = {
            "caption": prepared.caption or "", "lyrics": prepared.lyrics or "",
            "bpm": int(prepared.bpm) if prepared.bpm else None,
            "key_scale": prepared.key_scale or "", "time_signature": prepared.time_signature or "",
            "audio_duration": float(duration) if duration else None,
            "use_cot_caption": prepared.use_cot_caption, "use_cot_language": prepared.use_cot_language,
        }
        # The user's own metas win over what sample mode wrote (the reference lets the sample's
        # duration, bpm, key and time signature replace them; format is told them anyway).
        for name in ("bpm", "key_scale", "time_signature", "audio_duration"):
            if getattr(request, name) not in (None, ""):
                update[name] = getattr(request, name)
        return request.model_copy(update=update), prepared

    def lm_inputs_info(self, info: dict[str, Any], request: GenerationRequest,
                       prepared: lm_tasks.PreparedLlmInputs) -> dict[str, Any]:
        """The result info with what sample mode / format wrote: bpm, key and time signature, and
        under `metas` the caption, lyrics and the tasks that ran."""
        metas = dict(info.get("metas") or {})
        metas |= {"caption": request.caption, "lyrics": request.lyrics,
                  "lm_tasks": [name for name, _ in prepared.lm_results]}
        lm = self.lm_for(request.lm_model_path, request.lm_backend)
        extra = {"bpm": request.bpm, "keyscale": request.key_scale or None,
                 "timesignature": request.time_signature or None, "lm_model": lm.name, "lm_backend": lm.backend}
        return info | {k: v for k, v in extra.items() if k not in info and v is not None} | {"metas": metas}

    def run_lm_task(self, task: str, params: dict, progress: Progress) -> dict[str, Any]:
        """One of the LM's own tasks, for the synchronous routes; the answer in the shape of the
        reference API's responses.

        task "format" (`/format_input`): params caption (alias prompt), lyrics, bpm, audio_duration
        (alias duration), key_scale (keyscale), time_signature (timesignature), vocal_language
        (language); the given metas are forced into the LM's metadata block.
        task "create_sample" (`/v1/create_sample`, `/create_random_sample`): params query (aliases
        sample_query, description; empty: the LM invents one), instrumental (default: sniffed from
        the query), vocal_language (default: sniffed from the query; unknown: none).
        task "understand": params audio_code_string (alias audio_codes): `<|audio_code_N|>` tokens.
        Every task also takes lm_temperature (temperature, default 0.85), lm_top_k (top_k), lm_top_p
        (top_p), lm_repetition_penalty (repetition_penalty), seed, lm_model_path, lm_backend.

        Returns {"caption", "lyrics", "bpm", "duration", "key_scale", "time_signature",
        "vocal_language", "status_message", "lm_model", "lm_backend"} (create_sample adds
        "instrumental"); bpm an int or None, duration seconds (float) or None, the texts "" when
        unknown. Raises PipelineError (not retryable) for an unknown task, bad params or no LM.
        """
        if task not in lm_tasks.TASKS:
            raise PipelineError(f"unknown LM task {task!r}; one of {', '.join(lm_tasks.TASKS)}")
        values = _task_params(task, params)
        lm = self.lm_for(values.pop("lm_model_path", None), values.pop("lm_backend", None))
        if lm is None:
            raise PipelineError(f"the LM task {task} needs a 5 Hz LM, and this worker has none loaded")
        options = {key: values.pop(key) for key in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
                   if key in values}
        options["max_duration"] = self.lm_limits.max_duration
        stages = Stages(progress)
        lm = ReportingLM(lm, stages)
        try:
            with torch.inference_mode():
                if task == "format":
                    metas = {"bpm": values.get("bpm"), "duration": values.get("audio_duration"),
                             "keyscale": values.get("key_scale"), "timesignature": values.get("time_signature")}
                    language = values.get("vocal_language")
                    if language and language != "unknown":
                        metas["language"] = language
                    result = lm_tasks.format_sample(lm, values.get("caption", ""), values.get("lyrics", ""),
                                                    {k: v for k, v in metas.items() if v is not None}, **options)
                elif task == "create_sample":
                    query = values.get("query", "")
                    hinted_language, hinted_instrumental = lm_tasks.parse_description_hints(query)
                    instrumental = values.get("instrumental")
                    language = values.get("vocal_language", hinted_language)
                    result = lm_tasks.create_sample(lm, query, hinted_instrumental if instrumental is None else instrumental,
                                                    language, **options)
                else:
                    result = lm_tasks.understand_music(lm, values.get("audio_code_string", ""), **options)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory on {self.device}: {exc}") from None
        if not result.success:
            raise PipelineError(f"the LM task {task} failed: {result.error or result.status_message}")
        stages("lm", 1.0)
        answer = {
            "caption": result.caption, "lyrics": result.lyrics, "bpm": result.bpm, "duration": result.duration,
            "key_scale": result.keyscale, "time_signature": result.timesignature, "vocal_language": result.language,
        }
        if task == "create_sample":
            answer["instrumental"] = result.instrumental
        return answer | {"status_message": result.status_message, "lm_model": lm.name, "lm_backend": lm.backend}

    def result_info(self, text: GenerationPlan, plan: Latents, seeds: list[int], lm) -> dict[str, Any]:
        """seed_value, generation_info and, when the LM ran, what it decided (bpm, duration, ...)."""
        seconds = plan.samples / SAMPLE_RATE
        info: dict[str, Any] = {
            "seed_value": ",".join(str(s) for s in seeds),
            "generation_info": f"{self.dit_name}: {text.task_type}, {len(seeds)} x {seconds:g} s",
            "dit_model": self.dit_name,
            "duration": seconds,
        }
        if text.lm.metadata_request is not None or text.lm.codes_requests:  # the LM was called
            meta = text.metadata
            info |= {"bpm": meta.get("bpm"), "genres": meta.get("genres"), "keyscale": meta.get("keyscale"),
                     "timesignature": meta.get("timesignature"), "metas": {k: v for k, v in meta.items() if v not in (None, "")},
                     "lm_model": lm.name, "lm_backend": lm.backend}
        return {k: v for k, v in info.items() if v is not None}


# run_lm_task's params: name -> (canonical name, parser); the aliases are the reference API's.
def _as_text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PipelineError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _as_number(kind: type) -> Any:
    def parse(name: str, value: Any) -> Any:
        if value is None or value == "":
            return None
        if isinstance(value, bool):
            raise PipelineError(f"{name} must be a number, got {value!r}")
        try:
            return kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise PipelineError(f"{name} must be a number, got {value!r}") from None
    return parse


def _as_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise PipelineError(f"{name} must be true or false, got {value!r}")


_COMMON_TASK_PARAMS = {
    "lm_temperature": ("temperature", _as_number(float)), "temperature": ("temperature", _as_number(float)),
    "lm_top_k": ("top_k", _as_number(int)), "top_k": ("top_k", _as_number(int)),
    "lm_top_p": ("top_p", _as_number(float)), "top_p": ("top_p", _as_number(float)),
    "lm_repetition_penalty": ("repetition_penalty", _as_number(float)),
    "repetition_penalty": ("repetition_penalty", _as_number(float)),
    "seed": ("seed", _as_number(int)), "lm_model_path": ("lm_model_path", _as_text), "lm_backend": ("lm_backend", _as_text),
}
_TASK_PARAMS = {
    "format": {
        "caption": ("caption", _as_text), "prompt": ("caption", _as_text), "lyrics": ("lyrics", _as_text),
        "bpm": ("bpm", _as_number(int)), "audio_duration": ("audio_duration", _as_number(float)),
        "duration": ("audio_duration", _as_number(float)), "key_scale": ("key_scale", _as_text),
        "keyscale": ("key_scale", _as_text), "time_signature": ("time_signature", _as_text),
        "timesignature": ("time_signature", _as_text), "vocal_language": ("vocal_language", _as_text),
        "language": ("vocal_language", _as_text),
    },
    "create_sample": {
        "query": ("query", _as_text), "sample_query": ("query", _as_text), "description": ("query", _as_text),
        "instrumental": ("instrumental", _as_bool), "vocal_language": ("vocal_language", _as_text),
        "language": ("vocal_language", _as_text),
    },
    "understand": {"audio_code_string": ("audio_code_string", _as_text), "audio_codes": ("audio_code_string", _as_text)},
}


def _task_params(task: str, params: dict) -> dict[str, Any]:
    """`params` parsed for `task`: aliases to one name, values checked; unknown keys are refused."""
    if not isinstance(params, dict):
        raise PipelineError(f"LM task params must be an object, got {type(params).__name__}")
    known = _TASK_PARAMS[task] | _COMMON_TASK_PARAMS
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise PipelineError(f"unknown parameter(s) for the LM task {task}: {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in params.items():
        name, parse = known[key]
        parsed = parse(key, value)
        if parsed is not None:
            values[name] = parsed
    temperature = values.get("temperature")
    if temperature is not None and not 0 < temperature <= 5:
        raise PipelineError(f"lm_temperature must be in (0, 5], got {temperature}")
    if values.get("lm_backend") not in (None, "", "pt", "vllm"):
        raise PipelineError(f"lm_backend must be vllm or pt, got {values['lm_backend']!r}")
    return values


def read_audio(path: str, what: str, max_seconds: float | None = None) -> np.ndarray:
    """An input file as stereo 48 kHz (at most `max_seconds`, else load_audio's own cap); a file
    that cannot be read is the job's error, named."""
    try:
        return load_audio(Path(path)) if max_seconds is None else load_audio(Path(path), max_seconds=max_seconds)
    except (AudioError, OSError) as exc:
        raise PipelineError(f"{what}: {exc}") from None


def fit_frames(latents: torch.Tensor, frames: int, filler: torch.Tensor) -> torch.Tensor:
    """Crop `latents` [B, T, C] to `frames`, or pad its end with `filler` frames."""
    if latents.shape[1] >= frames:
        return latents[:, :frames]
    tail = filler[:, latents.shape[1]:frames].to(latents.dtype).expand(latents.shape[0], -1, -1)
    return torch.cat([latents, tail], dim=1)


def _no_progress(stage: str, fraction: float, **facts) -> None:
    """The progress of the groups that do not report it (`sample_groups`)."""


def check_vae_width(vae: Vae, name: str, dit: AceStepDiT) -> None:
    if vae.latent_dim != dit.config.audio_acoustic_hidden_dim:
        raise PipelineError(f"the VAE's latent width {vae.latent_dim} does not match {name}'s "
                            f"audio_acoustic_hidden_dim {dit.config.audio_acoustic_hidden_dim}")


def load_pipeline(checkpoint_dir: Path | None, options: PipelineOptions = PipelineOptions()) -> AceStepPipeline:
    """The worker's factory: the checkpoints in `checkpoint_dir` (ACESTEP_CHECKPOINT_DIR), configured by `options`."""
    if checkpoint_dir is None:
        raise PipelineError("no checkpoint directory: set ACESTEP_CHECKPOINT_DIR (or run make-tiny-checkpoints for a test set)")
    return AceStepPipeline.from_checkpoints(discover(Path(checkpoint_dir)), options)
