"""The ACE-Step 1.5 pipeline the worker runs: request dict in, stereo 48 kHz audio out.

`load_pipeline(checkpoint_dir)` is the worker's default factory (ACESTEP_PIPELINE). One request:

1. seeds (one per batch item; `seed_value` reports the ones used), the task and its length;
2. text: caption prompt (instruction, caption, metas) through the Qwen3 text encoder; lyric prompt
   through its embedding table only;
3. audio inputs through the VAE: the source (cover, repaint) and the timbre reference (three 10 s
   slices of 30 s), or the checkpoint's silence latent;
4. the DiT sampler (turbo: fixed schedule, no guidance; base/SFT: guidance) from per-item seeded noise;
5. tiled VAE decode, cropped to exactly the requested number of samples.

Documented choices where the reference is loose: a request without a duration (and no source
audio) gets 30 s, which is what its caption metas already say; a fixed seed s gives items s, s+1, ...
(the reference fixes only the first item); errors in the inputs are job errors with a clear message.
The 5 Hz LM (`thinking`, metadata completion) is the LM stage's job; without an LM loaded,
`thinking=true` fails the job saying so."""

import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import prompts
from pipeline.audio_io import SAMPLE_RATE, AudioError, load_audio
from pipeline.checkpoints import Checkpoints, discover
from pipeline.dit.load import load_dit, load_silence_latent
from pipeline.dit.model import AceStepDiT
from pipeline.interface import GeneratedAudio, OutOfMemory, PipelineError
from pipeline.sampler import Guidance, generate_audio
from pipeline.text_encoder import TextEncoder
from pipeline.vae import Vae

log = logging.getLogger(__name__)

DEFAULT_DIT = "acestep-v15-turbo"
DEFAULT_DURATION_SECONDS = 30.0
MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 1.0, 600.0
MIN_SOURCE_SECONDS = 1.0
TIMBRE_SECONDS, TIMBRE_SLICE_SECONDS = 30.0, 10.0
MAX_SEED = 2**32 - 1
CODES_PER_SECOND = 5
SILENCE = 1e-5

Progress = Callable[[str, float], None]


def pick_device() -> tuple[torch.device, torch.dtype]:
    """ACESTEP_DEVICE (cpu, cuda, cuda:1) or CUDA when present; bf16 on CUDA, float32 on CPU."""
    name = os.environ.get("ACESTEP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Plan:
    """One request made concrete: the task, the frames to generate and what conditions them."""

    task: str
    frames: int
    samples: int
    seeds: list[int]
    instruction: str
    metas: str
    src_latents: torch.Tensor  # [1, frames, C]
    chunk_mask: torch.Tensor  # [1, frames] bool
    is_cover: bool
    repaint_mask: torch.Tensor | None = None
    clean_src: torch.Tensor | None = None
    codes: list[list[int]] | None = None


class AceStepPipeline:
    def __init__(self, checkpoints: Checkpoints, *, dit_name: str | None = None, device=None, dtype=None):
        default_device, default_dtype = pick_device()
        self.device = torch.device(device) if device is not None else default_device
        self.dtype = dtype or default_dtype
        self.checkpoints = checkpoints
        self.dit_name = dit_name or (DEFAULT_DIT if DEFAULT_DIT in checkpoints.dits else sorted(checkpoints.dits)[0])
        folder = checkpoints.dit(self.dit_name).path
        self.dit: AceStepDiT = load_dit(folder, device=self.device, dtype=self.dtype)
        self.silence = load_silence_latent(folder, device=self.device, dtype=self.dtype)
        self.vae = Vae.load(checkpoints.vae.path, device=self.device, dtype=self.dtype)
        self.text = TextEncoder.load(checkpoints.text_encoder.path, device=self.device, dtype=self.dtype)
        self.frame_rate = self.vae.sample_rate / self.vae.hop_length
        if self.vae.latent_dim != self.dit.config.audio_acoustic_hidden_dim:
            raise PipelineError(f"the VAE's latent width {self.vae.latent_dim} does not match the DiT's "
                                f"audio_acoustic_hidden_dim {self.dit.config.audio_acoustic_hidden_dim}")
        self.lm = None  # the 5 Hz LM stage plugs in here

    # ---- planning -------------------------------------------------------------------------------

    def seeds(self, request: dict[str, Any], batch: int) -> list[int]:
        seed = int(request.get("seed", -1))
        if request.get("use_random_seed", True) or seed < 0:
            return [secrets.randbelow(MAX_SEED + 1) for _ in range(batch)]
        return [(seed + i) % (MAX_SEED + 1) for i in range(batch)]

    def silence_frames(self, frames: int) -> torch.Tensor:
        """The first `frames` frames of the silence latent, repeated when it is shorter."""
        silence = self.silence
        if silence.shape[1] < frames:
            silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
        return silence[:, :frames]

    def encode_file(self, path: str, what: str) -> tuple[torch.Tensor, int]:
        """Audio file -> (latents [1, T, C], samples at 48 kHz)."""
        try:
            audio = load_audio(Path(path))
        except (AudioError, OSError) as exc:
            raise PipelineError(f"{what}: {exc}") from None
        return self.vae.encode(torch.from_numpy(audio)[None].to(self.device, self.dtype)), audio.shape[1]

    def timbre_latents(self, path: str | None, seeds: list[int]) -> torch.Tensor:
        """[batch, timbre frames, C]: the reference audio as three random 10 s slices (one from each
        third, drawn with the item's seed) making 30 s, VAE-encoded; else the silence latent."""
        frames = self.dit.config.timbre_fix_frame
        if path is None:
            return self.silence_frames(frames).expand(len(seeds), -1, -1)
        try:
            audio = load_audio(Path(path))
        except (AudioError, OSError) as exc:
            raise PipelineError(f"reference audio: {exc}") from None
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

    def plan(self, request: dict[str, Any], batch: int) -> Plan:
        task = request.get("task_type", "text2music")
        files = request.get("input_files") or {}
        seeds = self.seeds(request, batch)
        codes = parse_code_strings(request.get("audio_code_string") or "", batch)
        duration = request.get("audio_duration")
        src = clean = repaint_mask = None
        src_samples = 0
        if task in ("cover", "repaint"):
            if "src" not in files:
                raise PipelineError(f"{task} needs source audio (src_audio_path or an uploaded src_audio)")
            src, src_samples = self.encode_file(files["src"], "source audio")
            if src_samples < MIN_SOURCE_SECONDS * SAMPLE_RATE:
                raise PipelineError(f"source audio is {src_samples / SAMPLE_RATE:.2f} s long; "
                                    f"at least {MIN_SOURCE_SECONDS:g} s is needed")
        if task == "repaint":
            src_seconds = src.shape[1] / self.frame_rate
            start = float(request.get("repainting_start") or 0.0)
            end = request.get("repainting_end")
            end = src_seconds if end is None or end < 0 else float(end)
            if end <= start or start > src_seconds or end < 0:
                raise PipelineError(f"repaint window [{start:g}, {end:g}] s must overlap the {src_seconds:.2f} s of "
                                    "source audio (it may extend past either end to out-paint)")
            pad_left = round(max(-start, 0.0) * self.frame_rate)
            total = max(end, src_seconds) - min(start, 0.0)
            frames = round(total * self.frame_rate)
            if total > MAX_DURATION_SECONDS:
                raise PipelineError(f"repaint result would be {total:.1f} s; at most {MAX_DURATION_SECONDS:g} s")
            clean = torch.zeros(1, frames, src.shape[2], device=self.device, dtype=self.dtype)
            clean[:, pad_left:pad_left + src.shape[1]] = src[:, : frames - pad_left]
            lo = round((max(start, 0.0) - min(start, 0.0)) * self.frame_rate)
            hi = min(round((end - min(start, 0.0)) * self.frame_rate), frames)
            repaint_mask = torch.zeros(1, frames, dtype=torch.bool, device=self.device)
            repaint_mask[:, lo:hi] = True
            src_latents = torch.where(repaint_mask[..., None], self.silence_frames(frames), clean)
            samples, seconds = round(total * SAMPLE_RATE), total
        else:
            if duration is None and src is not None:
                duration = src_samples / SAMPLE_RATE
            elif duration is None and codes is not None:
                duration = len(codes[0]) / CODES_PER_SECOND
            elif duration is None:
                duration = DEFAULT_DURATION_SECONDS
            seconds = float(duration)
            if not MIN_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
                raise PipelineError(f"audio_duration must be within {MIN_DURATION_SECONDS:g}-{MAX_DURATION_SECONDS:g} s")
            samples = round(seconds * SAMPLE_RATE)
            frames = -(-samples // self.vae.hop_length)
            silence = self.silence_frames(frames)
            src_latents = fit_frames(src, frames, silence) if src is not None else silence
        chunk_mask = repaint_mask if repaint_mask is not None else torch.ones(1, frames, dtype=torch.bool, device=self.device)
        is_cover = task == "cover" or codes is not None
        if codes is not None and task == "repaint":
            raise PipelineError("audio_code_string cannot be combined with task_type repaint")
        instruction = request.get("instruction") or prompts.DEFAULT_INSTRUCTION
        if instruction == prompts.DEFAULT_INSTRUCTION:  # the default follows the task, as in the reference
            instruction = prompts.LM_CODES_INSTRUCTION if is_cover else prompts.instruction_for(task)
        metas = prompts.format_metas(request.get("bpm"), request.get("key_scale"), request.get("time_signature"), seconds)
        return Plan(task, frames, samples, seeds, instruction, metas, src_latents, chunk_mask, is_cover,
                    repaint_mask, clean, codes)

    # ---- running --------------------------------------------------------------------------------

    def run(self, request: dict[str, Any], progress: Progress) -> GeneratedAudio:
        if request.get("thinking") and self.lm is None:
            raise PipelineError("thinking=true needs a 5 Hz LM, and this worker has none loaded")
        batch = int(request.get("batch_size") or 1)
        try:
            with torch.inference_mode():
                return self._run(request, batch, progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory on {self.device}: {exc}") from None

    def _run(self, request: dict[str, Any], batch: int, progress: Progress) -> GeneratedAudio:
        progress("preparing", 0.02)
        plan = self.plan(request, batch)
        caption = prompts.extract_sft_caption(request.get("caption") or "")
        text, text_mask = self.text.encode_text([prompts.caption_prompt(plan.instruction, caption, plan.metas)] * batch)
        lyrics, lyric_mask = self.text.embed_lyrics(
            [prompts.lyric_prompt(request.get("lyrics") or "", request.get("vocal_language") or "en")] * batch
        )
        timbre = self.timbre_latents((request.get("input_files") or {}).get("ref"), plan.seeds)
        progress("dit", 0.1)
        noise = torch.cat([
            torch.randn((1, plan.frames, self.silence.shape[2]), generator=torch.Generator(self.device).manual_seed(s),
                        device=self.device, dtype=self.dtype)
            for s in plan.seeds
        ])
        expand = lambda t: t.expand(batch, *t.shape[1:]) if t is not None else None  # noqa: E731
        config = self.dit.config
        codes = None
        if plan.codes is not None:
            needed = -(-plan.frames // config.pool_window_size)
            if len(plan.codes[0]) < needed:
                raise PipelineError(f"audio_code_string holds {len(plan.codes[0])} codes; {needed} (5 per second) "
                                    f"are needed for {plan.samples / SAMPLE_RATE:g} s")
            codes = torch.tensor(plan.codes, device=self.device, dtype=torch.long)[..., None]
        non_cover_text = non_cover_mask = None
        if request.get("audio_cover_strength", 1.0) < 1.0 and plan.is_cover:
            plain = prompts.caption_prompt(prompts.DEFAULT_INSTRUCTION, caption, plan.metas)
            non_cover_text, non_cover_mask = self.text.encode_text([plain] * batch)
        guidance = None if config.turbo else Guidance(scale=float(request.get("guidance_scale", 7.0)))
        generator = torch.Generator(self.device).manual_seed(plan.seeds[0])
        latents = generate_audio(
            self.dit,
            text_hidden_states=text, text_attention_mask=text_mask,
            lyric_hidden_states=lyrics, lyric_attention_mask=lyric_mask,
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.arange(batch, device=self.device),
            silence_latent=self.silence_frames(max(plan.frames, config.pool_window_size)),
            src_latents=expand(plan.src_latents),
            chunk_masks=expand(plan.chunk_mask)[..., None].expand(-1, -1, self.silence.shape[2]),
            is_covers=torch.full((batch,), plan.is_cover, device=self.device),
            noise=noise,
            audio_codes=codes,
            audio_cover_strength=float(request.get("audio_cover_strength", 1.0)) if plan.is_cover else 1.0,
            non_cover_text_hidden_states=non_cover_text, non_cover_text_attention_mask=non_cover_mask,
            repaint_mask=expand(plan.repaint_mask), clean_src_latents=expand(plan.clean_src),
            shift=float(request.get("shift", 3.0)),
            guidance=guidance, steps=int(request.get("inference_steps", 8)),
            infer_method=request.get("infer_method", "ode"), generator=generator,
            progress=lambda step, steps: progress("dit", 0.1 + 0.7 * step / steps),
        )
        progress("vae", 0.82)
        audio = self.vae.decode(latents)[:, :, : plan.samples].float().numpy()
        audios = [finish_audio(item, index) for index, item in enumerate(audio)]
        progress("vae", 0.95)
        info = {
            "seed_value": ",".join(str(s) for s in plan.seeds),
            "generation_info": f"{self.dit_name}: {plan.task}, {len(plan.seeds)} x {plan.samples / SAMPLE_RATE:g} s",
            "dit_model": self.dit_name,
            "duration": plan.samples / SAMPLE_RATE,
        }
        return GeneratedAudio(audios, SAMPLE_RATE, info)


def fit_frames(latents: torch.Tensor, frames: int, filler: torch.Tensor) -> torch.Tensor:
    """Crop `latents` [B, T, C] to `frames`, or pad its end with `filler` frames."""
    if latents.shape[1] >= frames:
        return latents[:, :frames]
    tail = filler[:, latents.shape[1]:frames].to(latents.dtype).expand(latents.shape[0], -1, -1)
    return torch.cat([latents, tail], dim=1)


def parse_code_strings(value: str | list[str], batch: int) -> list[list[int]] | None:
    """`<|audio_code_N|>` tokens (one string for all items, or one per item) -> integers clamped to
    the codebook; None when there are none."""
    strings = value if isinstance(value, list) else [value] * batch
    parsed = [[min(max(int(n), 0), 63999) for n in re.findall(r"<\|audio_code_(\d+)\|>", s)] for s in strings]
    if not any(parsed):
        return None
    if len({len(p) for p in parsed}) != 1:
        raise PipelineError("every audio_code_string of a batch must hold the same number of codes")
    return parsed


def finish_audio(audio: np.ndarray, index: int) -> np.ndarray:
    """Refuse non-finite or silent output; scale down only if it would clip."""
    if not np.isfinite(audio).all():
        raise PipelineError(f"item {index}: the generated audio holds NaN or infinite values", retryable=True)
    peak = float(np.abs(audio).max())
    if peak <= SILENCE:
        raise PipelineError(f"item {index}: the generated audio is silent", retryable=True)
    return audio / peak if peak > 1.0 else audio


def load_pipeline(checkpoint_dir: Path | None) -> AceStepPipeline:
    """The worker's factory: the checkpoints in `checkpoint_dir` (ACESTEP_CHECKPOINT_DIR)."""
    if checkpoint_dir is None:
        raise PipelineError("no checkpoint directory: set ACESTEP_CHECKPOINT_DIR (or run make-tiny-checkpoints for a test set)")
    checkpoints = discover(Path(checkpoint_dir))
    return AceStepPipeline(checkpoints, dit_name=os.environ.get("ACESTEP_DIT_MODEL") or None)
