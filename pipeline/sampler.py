"""Samplers, apart from the model: schedules, the turbo Euler/SDE loop with cover and repaint
handling, and the base/SFT loop with classifier-free guidance.

Rectified flow: x_t = t * noise + (1 - t) * x0 and the DiT predicts v = noise - x0.

Turbo checkpoints (distilled, no guidance) use fixed 8-entry schedules: the shift transform
s t / (1 + (s - 1) t) of t = 1, 7/8, ..., 1/8 for shift 1, 2 or 3 (other shifts snap to the
nearest). Custom timesteps snap to the nearest of the 20 values those schedules hold. Each schedule
is held in float32, as the reference does (double values move the second step by ~2e-5).
Base/SFT checkpoints use `steps` points of linspace(1, 0) with the same shift transform and CFG."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.contract import TURBO_STEPS
from pipeline.dit.model import AceStepDiT, CrossAttentionCache

TURBO_SHIFTS = (1.0, 2.0, 3.0)
MAX_CUSTOM_TIMESTEPS = 20


def shift_timestep(t: float, shift: float) -> float:
    return shift * t / (1 + (shift - 1) * t)


def turbo_schedule(shift: float) -> list[float]:
    shift = min(TURBO_SHIFTS, key=lambda s: abs(s - shift))
    return [shift_timestep(1 - i / TURBO_STEPS, shift) for i in range(TURBO_STEPS)]


VALID_TURBO_TIMESTEPS = sorted({t for s in TURBO_SHIFTS for t in turbo_schedule(s)}, reverse=True)


def snap_timesteps(timesteps: list[float]) -> list[float]:
    """Custom timesteps -> the nearest valid turbo values (trailing zeros dropped, at most 20)."""
    values = list(timesteps)
    while values and values[-1] == 0:
        values.pop()
    if not values:
        raise ValueError("timesteps must hold at least one value above 0")
    return [min(VALID_TURBO_TIMESTEPS, key=lambda v: abs(v - t)) for t in values[:MAX_CUSTOM_TIMESTEPS]]


def base_schedule(steps: int, shift: float) -> list[float]:
    """`steps` timesteps from 1 down (0 excluded) with the shift transform, for base/SFT models."""
    if steps < 1:
        raise ValueError("inference_steps must be at least 1")
    return [shift_timestep(1 - i / steps, shift) for i in range(steps)]


@dataclass
class Guidance:
    """Guidance for base/SFT checkpoints: the unconditional branch replaces the condition states by
    the checkpoint's `null_condition_emb`; the two predictions are combined by adaptive projected
    guidance (the reference's default) or plain CFG, on steps whose t lies in [interval_start,
    interval_end]. Scale <= 1 means no guidance."""

    scale: float = 7.0
    interval_start: float = 0.0
    interval_end: float = 1.0
    method: str = "apg"  # or "cfg"
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 2.5
    apg_eta: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def applies_at(self, t: float) -> bool:
        return self.interval_start <= t <= self.interval_end


class _Momentum:
    def __init__(self, momentum: float):
        self.momentum = momentum
        self.average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.average = value + self.momentum * self.average
        return self.average


def apg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance: Guidance, momentum: _Momentum) -> torch.Tensor:
    """Adaptive projected guidance on [B, T, C] velocities: the momentum-averaged difference, its norm
    over time clipped per channel, split into parts parallel and orthogonal to the conditional
    prediction (in float64); the parallel part is weighted by `apg_eta`."""
    diff = momentum.update(cond - uncond)
    if guidance.apg_norm_threshold > 0:
        norm = diff.norm(p=2, dim=1, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), guidance.apg_norm_threshold / norm)
    unit = torch.nn.functional.normalize(cond.double(), dim=1)
    parallel = (diff.double() * unit).sum(dim=1, keepdim=True) * unit
    orthogonal = diff.double() - parallel
    update = orthogonal.to(cond.dtype) + guidance.apg_eta * parallel.to(cond.dtype)
    return cond + (guidance.scale - 1) * update


def guide(cond: torch.Tensor, uncond: torch.Tensor, guidance: Guidance, momentum: _Momentum) -> torch.Tensor:
    if guidance.method == "apg":
        return apg_combine(cond, uncond, guidance, momentum)
    return uncond + guidance.scale * (cond - uncond)


@dataclass
class Condition:
    """What the decoder is conditioned on for one phase of sampling."""

    encoder_hidden_states: torch.Tensor
    context_latents: torch.Tensor
    cache: CrossAttentionCache | None = None

    def cached(self, model: AceStepDiT) -> CrossAttentionCache:
        if self.cache is None:
            self.cache = model.decoder.cross_cache(self.encoder_hidden_states)
        return self.cache

    def with_unconditional(self, null_embedding: torch.Tensor) -> "Condition":
        """Batch [conditional; unconditional]: the second half sees `null_embedding` everywhere."""
        states = self.encoder_hidden_states
        null = null_embedding.to(states.dtype).expand_as(states)
        return Condition(torch.cat([states, null]), torch.cat([self.context_latents, self.context_latents]))


def prepare_condition(
    model: AceStepDiT,
    *,
    text_hidden_states,
    text_attention_mask,
    lyric_hidden_states,
    lyric_attention_mask,
    refer_audio_acoustic_hidden_states_packed,
    refer_audio_order_mask,
    silence_latent,
    src_latents,
    chunk_masks,
    is_covers,
    precomputed_lm_hints_25Hz=None,
    audio_codes=None,
) -> Condition:
    """Condition states and context latents [src | chunk mask]; cover items take the 25 Hz hints
    (given, from codes, or from tokenizing and detokenizing their own source) as their source."""
    states, _mask = model.encoder(
        text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
        refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask,
    )
    frames = src_latents.shape[1]
    if bool(is_covers.any()):
        if precomputed_lm_hints_25Hz is not None:
            hints = precomputed_lm_hints_25Hz
        elif audio_codes is not None:
            hints = model.codes_to_hints(audio_codes)
        else:
            ones = torch.ones(src_latents.shape[:2], dtype=src_latents.dtype, device=src_latents.device)
            quantized, _indices, _pooled = model.tokenize(src_latents, silence_latent, ones)
            hints = model.detokenize(quantized)
        if hints.shape[1] < frames:
            raise ValueError(f"cover hints cover {hints.shape[1]} frames, fewer than the {frames} to generate")
        src_latents = torch.where(is_covers[:, None, None] > 0, hints[:, :frames].to(src_latents.dtype), src_latents)
    context = torch.cat([src_latents, chunk_masks.to(src_latents.dtype)], dim=-1)
    return Condition(states, context)


def repaint_blend(generated: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor, crossfade: int) -> torch.Tensor:
    """Keep `generated` inside the span, `clean` outside, with linear ramps (excluding 0 and 1) over
    `crossfade` frames on each side of the span."""
    soft = mask.to(generated.dtype).clone()
    if crossfade > 0:
        frames = mask.shape[1]
        for b in range(mask.shape[0]):
            row = mask[b]
            if bool(row.all()) or not bool(row.any()):
                continue
            inside = torch.nonzero(row).flatten()
            left, right = int(inside[0]), int(inside[-1]) + 1
            start = max(left - crossfade, 0)
            if left > start:
                soft[b, start:left] = torch.linspace(0, 1, left - start + 2, device=soft.device)[1:-1]
            end = min(right + crossfade, frames)
            if end > right:
                soft[b, right:end] = torch.linspace(1, 0, end - right + 2, device=soft.device)[1:-1]
    weight = soft[..., None]
    return weight * generated + (1.0 - weight) * clean


ProgressFn = Callable[[int, int], None]


def sample(
    model: AceStepDiT,
    cover: Condition,
    noise: torch.Tensor,
    *,
    schedule: list[float],
    non_cover: Condition | None = None,
    audio_cover_strength: float = 1.0,
    cover_noise_strength: float = 0.0,
    src_latents: torch.Tensor | None = None,
    repaint_mask: torch.Tensor | None = None,
    clean_src_latents: torch.Tensor | None = None,
    repaint_crossfade_frames: int = 10,
    repaint_injection_ratio: float = 0.5,
    infer_method: str = "ode",
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """The sampling loop over `schedule` (descending, 0 excluded; the last step goes to 0, so it
    returns x - v t). `cover` conditions the first int(steps x audio_cover_strength) steps and
    `non_cover` the rest. With cover_noise_strength > 0 sampling starts at the schedule entry nearest
    to 1 - strength from that mix of noise and `src_latents`. Repaint re-injects the noised clean
    source outside `repaint_mask` after each of the first round(ratio x steps) steps, then blends the
    span edges. "sde" re-noises the predicted x0 with `generator` instead of an Euler step (base
    models re-noise to the unshifted 1 - (i + 1) / steps, as the reference does). `guidance` (base
    and SFT models) batches the unconditional branch with the conditional one. Returns x0 latents."""
    if infer_method not in ("ode", "sde"):
        raise ValueError(f"infer_method must be 'ode' or 'sde', got {infer_method!r}")
    xt = noise
    if cover_noise_strength > 0.0:
        if src_latents is None:
            raise ValueError("cover_noise_strength needs src_latents")
        start = min(schedule, key=lambda t: abs(t - (1.0 - cover_noise_strength)))
        xt = start * noise + (1 - start) * src_latents
        schedule = schedule[schedule.index(start):]
    timesteps = torch.tensor(schedule, dtype=torch.float32).tolist() + [0.0]  # held in float32, as the reference
    steps = len(timesteps) - 1
    cover_steps = int(steps * audio_cover_strength)
    injection_steps = round(repaint_injection_ratio * steps)
    guided = guidance is not None and guidance.enabled
    if guided:
        null = model.null_condition_emb
        cover = cover.with_unconditional(null)
        non_cover = non_cover.with_unconditional(null) if non_cover is not None else None
    momentum = _Momentum(guidance.apg_momentum if guidance else 0.0)
    condition = cover
    if progress is not None:
        progress(0, steps)  # the conditions are ready: a report (and a cancel point) before the first step
    for step in range(steps):
        t, t_next = timesteps[step], timesteps[step + 1]
        if step >= cover_steps and non_cover is not None:
            condition = non_cover
        x_in = torch.cat([xt, xt]) if guided else xt
        t_batch = torch.full((x_in.shape[0],), t, dtype=noise.dtype, device=noise.device)
        velocity = model.decoder(x_in, t_batch, t_batch, None, condition.context_latents, cache=condition.cached(model))
        if guided:
            cond, uncond = velocity.chunk(2)
            velocity = guide(cond, uncond, guidance, momentum) if guidance.applies_at(t) else cond
        if infer_method == "sde":
            x0 = xt - velocity * t
            target = 1.0 - (step + 1) / steps if guidance is not None else t_next
            fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = target * fresh + (1 - target) * x0 if step < steps - 1 else x0
        else:
            xt = xt - velocity * (t - t_next)
        if repaint_mask is not None and clean_src_latents is not None and step < injection_steps and step < steps - 1:
            renoised = t_next * noise + (1.0 - t_next) * clean_src_latents
            xt = torch.where(repaint_mask[..., None].expand_as(xt), xt, renoised)
        if progress is not None:
            progress(step + 1, steps)
    if repaint_mask is not None and clean_src_latents is not None and repaint_crossfade_frames > 0:
        xt = repaint_blend(xt, clean_src_latents, repaint_mask, repaint_crossfade_frames)
    return xt


def generate_audio(
    model: AceStepDiT,
    *,
    text_hidden_states,
    text_attention_mask,
    lyric_hidden_states,
    lyric_attention_mask,
    refer_audio_acoustic_hidden_states_packed,
    refer_audio_order_mask,
    silence_latent,
    src_latents,
    chunk_masks,
    is_covers,
    noise,
    shift: float = 3.0,
    timesteps: list[float] | None = None,
    infer_method: str = "ode",
    audio_cover_strength: float = 1.0,
    non_cover_text_hidden_states=None,
    non_cover_text_attention_mask=None,
    precomputed_lm_hints_25Hz=None,
    audio_codes=None,
    cover_noise_strength: float = 0.0,
    repaint_mask=None,
    clean_src_latents=None,
    repaint_crossfade_frames: int = 10,
    repaint_injection_ratio: float = 0.5,
    guidance: Guidance | None = None,
    steps: int = TURBO_STEPS,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Generation with the reference's `generate_audio` arguments (noise given instead of a
    seed). Turbo checkpoints: pass no `guidance`; the schedule comes from `shift` or `timesteps`.
    Base/SFT checkpoints: pass `guidance` and `steps` (linspace schedule with the shift transform).
    With audio_cover_strength < 1 the later steps use a text2music condition: the non-cover caption,
    the silence latent as source, no cover items."""
    shared = dict(
        lyric_hidden_states=lyric_hidden_states,
        lyric_attention_mask=lyric_attention_mask,
        refer_audio_acoustic_hidden_states_packed=refer_audio_acoustic_hidden_states_packed,
        refer_audio_order_mask=refer_audio_order_mask,
        silence_latent=silence_latent,
        chunk_masks=chunk_masks,
    )
    cover = prepare_condition(
        model, text_hidden_states=text_hidden_states, text_attention_mask=text_attention_mask,
        src_latents=src_latents, is_covers=is_covers, precomputed_lm_hints_25Hz=precomputed_lm_hints_25Hz,
        audio_codes=audio_codes, **shared,
    )
    non_cover = None
    if audio_cover_strength < 1.0:
        batch, frames = src_latents.shape[:2]
        silence = silence_latent[:, :frames].to(src_latents.dtype).expand(batch, -1, -1)
        non_cover = prepare_condition(
            model,
            text_hidden_states=text_hidden_states if non_cover_text_hidden_states is None else non_cover_text_hidden_states,
            text_attention_mask=text_attention_mask if non_cover_text_attention_mask is None else non_cover_text_attention_mask,
            src_latents=silence, is_covers=torch.zeros_like(is_covers), **shared,
        )
    if guidance is None:
        schedule = snap_timesteps(timesteps) if timesteps else turbo_schedule(shift)
    else:
        schedule = base_schedule(steps, shift)
    return sample(
        model, cover, noise, schedule=schedule, non_cover=non_cover, audio_cover_strength=audio_cover_strength,
        cover_noise_strength=cover_noise_strength, src_latents=src_latents, repaint_mask=repaint_mask,
        clean_src_latents=clean_src_latents, repaint_crossfade_frames=repaint_crossfade_frames,
        repaint_injection_ratio=repaint_injection_ratio, infer_method=infer_method, guidance=guidance,
        generator=generator, progress=progress,
    )
