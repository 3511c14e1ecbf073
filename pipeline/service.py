"""The ACE-Step 1.5 pipeline the worker runs: a `GenerationRequest` in, stereo 48 kHz audio out.

`AceStepPipeline(components)` runs on parts already loaded (tests inject their own);
`AceStepPipeline.from_checkpoints(checkpoints, options)` loads them, and `load_pipeline(checkpoint_dir,
options)` is the worker's default factory (ACESTEP_PIPELINE). It reads no environment: the device,
the DiT, the LMs and their limits come in `PipelineOptions`. One request:

1. seeds (one per batch item; `seed_value` reports the ones used), the source audio when the task
   reads it;
2. the 5 Hz LM stage and every prompt string (`pipeline.lm.planner`): `thinking=true` writes the
   metadata block and the audio codes (the DiT then runs as cover from them), `thinking=false` only
   fills missing bpm/key/time signature/duration; the LM is skipped for cover and repaint;
3. text: caption prompt (instruction, caption, metas) through the Qwen3 text encoder; lyric prompt
   through its embedding table only;
4. audio inputs through the VAE: the source (cover, repaint) and the timbre reference (three 10 s
   slices of 30 s), or the checkpoint's silence latent;
5. the DiT sampler (turbo: fixed schedule, no guidance; base/SFT: guidance) from per-item seeded noise;
6. tiled VAE decode, cropped to exactly the requested number of samples.

Documented choices where the reference is loose: a request without a duration (and no source
audio) gets 30 s, which is what its caption metas already say; a fixed seed s gives items s, s+1, ...
(the reference fixes only the first item); errors in the inputs are job errors with a clear message;
without an LM loaded, `thinking=true` fails the job saying so and missing metadata stays N/A."""

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.audio_io import AudioError, load_audio
from pipeline.checkpoints import Checkpoints, discover
from pipeline.contract import DURATION_MAX, MAX_SEED, SAMPLE_RATE, SOURCE_TASK_TYPES, GenerationRequest, PipelineOptions
from pipeline.dit.load import load_dit, load_silence_latent
from pipeline.dit.model import AceStepDiT
from pipeline.interface import GeneratedAudio, OutOfMemory, PipelineError, Progress
from pipeline.lm.loading import VllmEngines, load_lms, select_lm, vllm_available
from pipeline.lm.planner import GenerationPlan, LMLimits, LMUnavailableError, params_from_request, plan_generation
from pipeline.sampler import Guidance, generate_audio
from pipeline.text_encoder import TextEncoder
from pipeline.vae import Vae

log = logging.getLogger(__name__)

MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 1.0, float(DURATION_MAX)  # codes may make songs under DURATION_MIN
MIN_SOURCE_SECONDS = 1.0
TIMBRE_SECONDS, TIMBRE_SLICE_SECONDS = 30.0, 10.0


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


@dataclass
class Latents:
    """What the DiT generates from: the frames, the source and masks, cover or not, the codes."""

    frames: int
    samples: int
    src_latents: torch.Tensor  # [1, frames, C]
    chunk_mask: torch.Tensor  # [1, frames] bool
    is_cover: bool
    repaint_mask: torch.Tensor | None = None
    clean_src: torch.Tensor | None = None
    codes: torch.Tensor | None = None  # [batch, codes, 1]


class AceStepPipeline:
    def __init__(self, components: Components):
        self.components = parts = components
        self.dit_name, self.dit, self.silence = parts.dit_name, parts.dit, parts.silence
        self.vae, self.text, self.device, self.dtype = parts.vae, parts.text, parts.device, parts.dtype
        self.lms, self.default_lm, self.engines, self.lm_limits = parts.lms, parts.default_lm, parts.engines, parts.lm_limits
        self.frame_rate = self.vae.sample_rate / self.vae.hop_length
        if self.vae.latent_dim != self.dit.config.audio_acoustic_hidden_dim:
            raise PipelineError(f"the VAE's latent width {self.vae.latent_dim} does not match the DiT's "
                                f"audio_acoustic_hidden_dim {self.dit.config.audio_acoustic_hidden_dim}")
        self.models = [self.dit_name, *sorted(self.lms)]  # reported to the workers table

    @classmethod
    def from_checkpoints(cls, checkpoints: Checkpoints, options: PipelineOptions = PipelineOptions()) -> "AceStepPipeline":
        """Load what `options` name from `checkpoints`; a name the checkpoints lack is an error that
        names its ACESTEP_* variable and what is there."""
        device, dtype = pick_device(options.device)
        if options.dit_model not in checkpoints.dits:
            raise PipelineError(f"{options.variables['dit_model']}={options.dit_model}: no such DiT in "
                                f"{checkpoints.root} (there: {', '.join(sorted(checkpoints.dits)) or 'none'})")
        for name in (*options.lm_models, *([options.lm_model] if options.lm_model else [])):
            if name not in checkpoints.lms:
                variable = options.variables["lm_model" if name == options.lm_model else "lm_models"]
                raise PipelineError(f"{variable}: no 5 Hz LM {name} in {checkpoints.root} "
                                    f"(there: {', '.join(sorted(checkpoints.lms)) or 'none'})")
        folder = checkpoints.dit(options.dit_model).path
        lms = load_lms(checkpoints, options.lm_models, device=device, dtype=dtype)
        engines = VllmEngines(options.vllm_gpu_memory_utilization) if options.vllm else None
        if engines is not None and device.type == "cuda" and vllm_available():
            for lm in lms.values():  # engines start with the worker, not inside its first job
                engines.backend(lm)
        return cls(Components(
            dit_name=options.dit_model,
            dit=load_dit(folder, device=device, dtype=dtype),
            silence=load_silence_latent(folder, device=device, dtype=dtype),
            vae=Vae.load(checkpoints.vae.path, device=device, dtype=dtype),
            text=TextEncoder.load(checkpoints.text_encoder.path, device=device, dtype=dtype),
            device=device, dtype=dtype, lms=lms, default_lm=options.lm_model, engines=engines,
            # The longest song the LM may plan (the reference caps it by GPU memory tier).
            lm_limits=LMLimits(max_duration=options.lm_max_duration),
        ))

    # ---- planning -------------------------------------------------------------------------------

    def seeds(self, request: GenerationRequest, batch: int) -> list[int]:
        if request.use_random_seed or request.seed < 0:
            return [secrets.randbelow(MAX_SEED + 1) for _ in range(batch)]
        return [(request.seed + i) % (MAX_SEED + 1) for i in range(batch)]

    def silence_frames(self, frames: int) -> torch.Tensor:
        """The first `frames` frames of the silence latent, repeated when it is shorter."""
        silence = self.silence
        if silence.shape[1] < frames:
            silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
        return silence[:, :frames]

    def encode_file(self, path: str, what: str) -> tuple[torch.Tensor, int]:
        """Audio file -> (latents [1, T, C], samples at 48 kHz)."""
        audio = read_audio(path, what)
        return self.vae.encode(torch.from_numpy(audio)[None].to(self.device, self.dtype)), audio.shape[1]

    def timbre_latents(self, path: str | None, seeds: list[int]) -> torch.Tensor:
        """[batch, timbre frames, C]: the reference audio as three random 10 s slices (one from each
        third, drawn with the item's seed) making 30 s, VAE-encoded; else the silence latent."""
        frames = self.dit.config.timbre_fix_frame
        if path is None:
            return self.silence_frames(frames).expand(len(seeds), -1, -1)
        audio = read_audio(path, "reference audio")
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

    def source(self, request: GenerationRequest) -> tuple[torch.Tensor | None, int]:
        """The source audio's latents and length in samples, for the tasks that read it (the
        worker has made `src_audio_path` a local file)."""
        task = request.task_type
        if task not in SOURCE_TASK_TYPES:
            return None, 0
        if not request.src_audio_path:
            raise PipelineError(f"{task} needs source audio (src_audio_path or an uploaded src_audio)")
        src, samples = self.encode_file(request.src_audio_path, "source audio")
        if samples < MIN_SOURCE_SECONDS * SAMPLE_RATE:
            raise PipelineError(f"source audio is {samples / SAMPLE_RATE:.2f} s long; at least {MIN_SOURCE_SECONDS:g} s is needed")
        return src, samples

    def text_plan(self, request: GenerationRequest, batch: int, seeds: list[int], src_samples: int) -> tuple[GenerationPlan, Any]:
        """The LM stage (when the request asks for it) and every string the DiT's text side reads;
        with the LM backend that was available to it (None without an LM)."""
        params = params_from_request(request)
        lm = None
        if self.lms:
            lm = select_lm(self.lms, request.lm_model_path or self.default_lm, request.lm_backend, self.engines)
        try:
            plan = plan_generation(params, lm, batch_size=batch, seeds=seeds, limits=self.lm_limits,
                                   src_audio_duration=src_samples / SAMPLE_RATE if src_samples else None)
        except LMUnavailableError:
            raise PipelineError("thinking=true needs a 5 Hz LM, and this worker has none loaded") from None
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        return plan, lm

    def latents(self, request: GenerationRequest, text: GenerationPlan, src: torch.Tensor | None) -> Latents:
        codes = [item.audio_codes for item in text.items]
        if any(codes) and not all(codes):
            raise PipelineError("audio_code_string must give codes for every item of the batch or for none")
        if any(codes) and len({len(c) for c in codes}) != 1:
            raise PipelineError("every audio_code_string of a batch must hold the same number of codes")
        if text.task_type == "repaint":
            if any(codes):
                raise PipelineError("audio_code_string cannot be combined with task_type repaint")
            return self.repaint_latents(request, src)
        seconds = text.duration
        if not MIN_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
            raise PipelineError(f"audio_duration must be within {MIN_DURATION_SECONDS:g}-{MAX_DURATION_SECONDS:g} s")
        samples = round(seconds * SAMPLE_RATE)
        frames = -(-samples // self.vae.hop_length)
        silence = self.silence_frames(frames)
        src_latents = fit_frames(src, frames, silence) if src is not None else silence
        chunk_mask = torch.ones(1, frames, dtype=torch.bool, device=self.device)
        code_tensor = None
        if all(codes):
            needed = -(-frames // self.dit.config.pool_window_size)
            if len(codes[0]) < needed:
                raise PipelineError(f"audio_code_string holds {len(codes[0])} codes; {needed} (5 per second) "
                                    f"are needed for {seconds:g} s")
            code_tensor = torch.tensor(codes, device=self.device, dtype=torch.long)[..., None]
        return Latents(frames, samples, src_latents, chunk_mask, text.task_type == "cover", codes=code_tensor)

    def repaint_latents(self, request: GenerationRequest, src: torch.Tensor) -> Latents:
        """The source with the window [start, end) replaced by silence and marked for regeneration;
        a window past either end of the source out-paints (the source is padded with zeros)."""
        src_seconds = src.shape[1] / self.frame_rate
        start = float(request.repainting_start)
        end = request.repainting_end
        end = src_seconds if end is None or end < 0 else float(end)
        if end <= start or start > src_seconds or end < 0:
            raise PipelineError(f"repaint window [{start:g}, {end:g}] s must overlap the {src_seconds:.2f} s of "
                                "source audio (it may extend past either end to out-paint)")
        total = max(end, src_seconds) - min(start, 0.0)
        if total > MAX_DURATION_SECONDS:
            raise PipelineError(f"repaint result would be {total:.1f} s; at most {MAX_DURATION_SECONDS:g} s")
        frames = round(total * self.frame_rate)
        pad_left = round(max(-start, 0.0) * self.frame_rate)
        clean = torch.zeros(1, frames, src.shape[2], device=self.device, dtype=self.dtype)
        clean[:, pad_left:pad_left + src.shape[1]] = src[:, : frames - pad_left]
        lo = round((max(start, 0.0) - min(start, 0.0)) * self.frame_rate)
        hi = min(round((end - min(start, 0.0)) * self.frame_rate), frames)
        mask = torch.zeros(1, frames, dtype=torch.bool, device=self.device)
        mask[:, lo:hi] = True
        src_latents = torch.where(mask[..., None], self.silence_frames(frames), clean)
        return Latents(frames, round(total * SAMPLE_RATE), src_latents, mask, False, mask, clean)

    # ---- running --------------------------------------------------------------------------------

    def run(self, request: GenerationRequest, progress: Progress) -> GeneratedAudio:
        batch = request.items
        try:
            with torch.inference_mode():
                return self._run(request, batch, progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory on {self.device}: {exc}") from None

    def _run(self, request: GenerationRequest, batch: int, progress: Progress) -> GeneratedAudio:
        progress("preparing", 0.02)
        seeds = self.seeds(request, batch)
        src, src_samples = self.source(request)
        if self.lms and request.thinking:
            progress("lm", 0.05)
        text, lm = self.text_plan(request, batch, seeds, src_samples)
        plan = self.latents(request, text, src)
        progress("conditioning", 0.3)
        captions, captions_mask = self.text.encode_text([item.caption_prompt for item in text.items])
        lyrics, lyric_mask = self.text.embed_lyrics([item.lyric_prompt for item in text.items])
        timbre = self.timbre_latents(request.reference_audio_path, seeds)
        non_cover_text = non_cover_mask = None
        strength = request.audio_cover_strength if plan.is_cover else 1.0
        if strength < 1.0:
            non_cover_text, non_cover_mask = self.text.encode_text([item.non_cover_caption_prompt for item in text.items])
        progress("dit", 0.35)
        noise = torch.cat([
            torch.randn((1, plan.frames, self.silence.shape[2]), generator=torch.Generator(self.device).manual_seed(s),
                        device=self.device, dtype=self.dtype)
            for s in seeds
        ])
        expand = lambda t: t.expand(batch, *t.shape[1:]) if t is not None else None  # noqa: E731
        config = self.dit.config
        guidance = None if config.turbo else Guidance(scale=request.guidance_scale)
        latents = generate_audio(
            self.dit,
            text_hidden_states=captions, text_attention_mask=captions_mask,
            lyric_hidden_states=lyrics, lyric_attention_mask=lyric_mask,
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.arange(batch, device=self.device),
            silence_latent=self.silence_frames(max(plan.frames, config.pool_window_size)),
            src_latents=expand(plan.src_latents),
            chunk_masks=expand(plan.chunk_mask)[..., None].expand(-1, -1, self.silence.shape[2]),
            is_covers=torch.full((batch,), plan.is_cover, device=self.device),
            noise=noise,
            audio_codes=plan.codes,
            audio_cover_strength=strength,
            non_cover_text_hidden_states=non_cover_text, non_cover_text_attention_mask=non_cover_mask,
            repaint_mask=expand(plan.repaint_mask), clean_src_latents=expand(plan.clean_src),
            guidance=guidance, steps=request.inference_steps,
            generator=torch.Generator(self.device).manual_seed(seeds[0]),
            progress=lambda step, steps: progress("dit", 0.35 + 0.45 * step / steps),
        )
        progress("vae", 0.82)
        audio = self.vae.decode(latents)[:, :, : plan.samples].float().numpy()
        progress("vae", 0.95)
        return GeneratedAudio(list(audio), SAMPLE_RATE, self.result_info(text, plan, seeds, lm))

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


def read_audio(path: str, what: str) -> np.ndarray:
    """An input file as stereo 48 kHz; a file that cannot be read is the job's error, named."""
    try:
        return load_audio(Path(path))
    except (AudioError, OSError) as exc:
        raise PipelineError(f"{what}: {exc}") from None


def fit_frames(latents: torch.Tensor, frames: int, filler: torch.Tensor) -> torch.Tensor:
    """Crop `latents` [B, T, C] to `frames`, or pad its end with `filler` frames."""
    if latents.shape[1] >= frames:
        return latents[:, :frames]
    tail = filler[:, latents.shape[1]:frames].to(latents.dtype).expand(latents.shape[0], -1, -1)
    return torch.cat([latents, tail], dim=1)


def load_pipeline(checkpoint_dir: Path | None, options: PipelineOptions = PipelineOptions()) -> AceStepPipeline:
    """The worker's factory: the checkpoints in `checkpoint_dir` (ACESTEP_CHECKPOINT_DIR), configured by `options`."""
    if checkpoint_dir is None:
        raise PipelineError("no checkpoint directory: set ACESTEP_CHECKPOINT_DIR (or run make-tiny-checkpoints for a test set)")
    return AceStepPipeline.from_checkpoints(discover(Path(checkpoint_dir)), options)
