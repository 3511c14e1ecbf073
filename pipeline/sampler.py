"""Samplers, apart from the model: schedules, guidance, and the sampling loop of the turbo and the
base/SFT checkpoints as upstream main runs them (6d467e4, 2026-06-26).

Rectified flow: x_t = t * noise + (1 - t) * x0 and the DiT predicts v = noise - x0.

Schedules. Turbo (distilled, no guidance): with `infer_steps` n (the serving path always gives it),
t_i = 1 - i/n for i < min(n, 20), shifted by s t / (1 + (s - 1) t) for any shift s; without it the
fixed 8-entry table of the nearest of shift 1, 2, 3. Custom timesteps (trailing zeros dropped, at
most 20) snap to the nearest of the 20 values those tables hold. The last step lands on
x0 = x - v t_last. Base/SFT: linspace(1, 0, n + 1) with the shift, in float32 tensor arithmetic;
custom timesteps are used verbatim (n = len - 1). Schedules are held in float32, as the reference does.

Each step: the decoder's velocity (base/SFT: on [x; x] with the null condition for the second half,
combined by APG, ADG or, on a Heun corrector, plain CFG, while t lies in the CFG interval), an
optional norm clamp and EMA of the velocity, then Euler, Heun (a corrector call at t_next, the two
velocities averaged) or SDE (re-noise the predicted x0), then DCW (`pipeline.dcw`), then the repaint
re-injection of the noised clean source outside the span. Repaint ends with a boundary blend.

Where upstream main has a bug that reaches the output, it is reproduced (and named here):
* base SDE re-noises to the unshifted 1 - (i + 1)/n, while the next decoder call uses the shifted t;
* base cover with custom timesteps switches to the non-cover condition after int(infer_steps x
  strength) steps, counting the `infer_steps` argument rather than the custom schedule's steps."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.contract import TURBO_STEPS
from pipeline.dcw import DCW
from pipeline.dit.model import AceStepDiT, CrossAttentionCache

TURBO_SHIFTS = (1.0, 2.0, 3.0)
MAX_TURBO_STEPS = 20  # turbo: at most this many steps, and custom timesteps snap to this many values


def shift_timestep(t: float, shift: float) -> float:
    return shift * t / (1 + (shift - 1) * t)


def turbo_schedule(shift: float, steps: int | None = None) -> list[float]:
    """Turbo timesteps (descending, 0 excluded). With `steps`: min(steps, 20) of them from 1 on, any
    shift applied. Without: the fixed 8-step table of the nearest of shift 1, 2 and 3."""
    if steps is None:
        shift = min(TURBO_SHIFTS, key=lambda s: abs(s - shift))
        steps = TURBO_STEPS
    if steps < 1:
        raise ValueError("inference_steps must be at least 1")
    steps = min(steps, MAX_TURBO_STEPS)
    values = [1 - i / steps for i in range(steps)]
    return values if shift == 1 else [shift_timestep(t, shift) for t in values]


VALID_TURBO_TIMESTEPS = sorted({t for s in TURBO_SHIFTS for t in turbo_schedule(s)}, reverse=True)


def snap_timesteps(timesteps: list[float]) -> list[float]:
    """Custom turbo timesteps -> the nearest valid turbo values (trailing zeros dropped, at most 20;
    duplicates kept)."""
    values = [float(t) for t in timesteps]
    while values and values[-1] == 0:
        values.pop()
    if not values:
        raise ValueError("timesteps must hold at least one value above 0")
    return [min(VALID_TURBO_TIMESTEPS, key=lambda v: abs(v - t)) for t in values[:MAX_TURBO_STEPS]]


def base_schedule(steps: int, shift: float) -> list[float]:
    """Base/SFT: the `steps + 1` timesteps linspace(1, 0) with the shift transform, in float32."""
    if steps < 1:
        raise ValueError("inference_steps must be at least 1")
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    if shift != 1:
        t = shift * t / (1 + (shift - 1) * t)
    return t.tolist()


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for base/SFT checkpoints: the unconditional branch replaces the
    condition states by the checkpoint's `null_condition_emb`. The two predictions are combined by
    adaptive projected guidance (APG, the default) or angle-based dynamic guidance (`use_adg`) on
    steps whose t lies in [interval_start, interval_end]; a Heun corrector uses plain CFG instead of
    APG. Scale <= 1 means no guidance."""

    scale: float = 7.0
    interval_start: float = 0.0
    interval_end: float = 1.0
    use_adg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 2.5
    apg_eta: float = 0.0
    adg_angle_clip: float = 3.14 / 6

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def applies_at(self, t: float) -> bool:
        return self.interval_start <= t <= self.interval_end


@dataclass(frozen=True)
class Sampling:
    """How each step moves: `infer_method` ode (Euler / Heun) or sde (re-noise the predicted x0),
    `sampler_mode` euler or heun, the velocity's norm clamp (relative to the latents' norm; 0 = off)
    and EMA across steps (0 = off), and DCW after every step (None = off)."""

    infer_method: str = "ode"
    sampler_mode: str = "euler"
    velocity_norm_threshold: float = 0.0
    velocity_ema_factor: float = 0.0
    dcw: DCW | None = None

    def __post_init__(self):
        if self.infer_method not in ("ode", "sde"):
            raise ValueError(f"infer_method must be 'ode' or 'sde', got {self.infer_method!r}")
        if self.sampler_mode not in ("euler", "heun"):
            raise ValueError(f"sampler_mode must be 'euler' or 'heun', got {self.sampler_mode!r}")


class MomentumBuffer:
    """APG's running average of the guidance difference, one per sampling loop."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.average = value + self.momentum * self.average
        return self.average


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, momentum: MomentumBuffer | None,
        norm_threshold: float = 2.5, eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance on [B, T, C] velocities: the momentum-averaged difference, its
    norm over time clipped per channel, split (in float64) into parts parallel and orthogonal to the
    conditional prediction; the parallel part weighted by `eta`."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=1, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    unit = torch.nn.functional.normalize(cond.double(), dim=1)
    parallel = (diff.double() * unit).sum(dim=1, keepdim=True) * unit
    orthogonal = diff.double() - parallel
    update = orthogonal.to(cond.dtype) + eta * parallel.to(cond.dtype)
    return cond + (scale - 1) * update


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def adg(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sigma: float, scale: float,
        angle_clip: float = 3.14 / 6) -> torch.Tensor:
    """Angle-based dynamic guidance: rotate the conditional x0 estimate away from the unconditional
    one by the per-frame angle between them times (scale - 1), clipped to `angle_clip`; the angle in
    float64. Returns the velocity that reaches the rotated estimate from x at `sigma` (= t)."""
    weight = max(scale - 1, 0.0) + 1e-3
    x0_cond, x0_uncond = x - sigma * cond, x - sigma * uncond
    a, b = x0_cond.double(), x0_uncond.double()
    cosine = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True)
    theta = torch.acos(cosine.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    rotated = torch.clip(weight * theta, -angle_clip, angle_clip)
    diff, base = (x0_cond - x0_uncond).float(), x0_uncond.float()
    along = (diff * base).sum(-1, keepdim=True) / ((base * base).sum(-1, keepdim=True) + 1e-8)
    perpendicular = diff - along * base
    sin_theta = torch.sin(theta)
    wide = sin_theta > 1e-3
    perp_part = torch.where(wide, perpendicular * torch.sin(rotated) / torch.where(wide, sin_theta, 1.0),
                            perpendicular * weight)
    x0_new = torch.cos(rotated) * x0_cond + perp_part
    return ((x - x0_new) / sigma).to(x.dtype)


@dataclass
class Condition:
    """What the decoder is conditioned on for one phase of sampling."""

    encoder_hidden_states: torch.Tensor
    context_latents: torch.Tensor
    cache: CrossAttentionCache | None = None
    key_mask: torch.Tensor | None = None  # [B, L] bool: the positions each item attends to (None: all)

    def cached(self, model: AceStepDiT) -> CrossAttentionCache:
        if self.cache is None:
            self.cache = model.decoder.cross_cache(self.encoder_hidden_states, self.key_mask)
        return self.cache

    def with_unconditional(self, null_embedding: torch.Tensor) -> "Condition":
        """Batch [conditional; unconditional]: the second half sees `null_embedding` everywhere."""
        states = self.encoder_hidden_states
        null = null_embedding.to(states.dtype).expand_as(states)
        mask = None if self.key_mask is None else torch.cat([self.key_mask, self.key_mask])
        return Condition(torch.cat([states, null]), torch.cat([self.context_latents, self.context_latents]), key_mask=mask)


def merge_conditions(conditions: list[Condition]) -> Condition:
    """Several jobs' conditions (equal frames) as one batch: each job's condition states padded to
    the longest with zeros that its items do not attend to, so every item sees exactly what it would
    alone."""
    if len(conditions) == 1:
        return conditions[0]
    longest = max(c.encoder_hidden_states.shape[1] for c in conditions)
    states, masks = [], []
    for c in conditions:
        batch, length, width = c.encoder_hidden_states.shape
        pad = c.encoder_hidden_states.new_zeros(batch, longest - length, width)
        states.append(torch.cat([c.encoder_hidden_states, pad], dim=1))
        own = torch.ones(batch, length, dtype=torch.bool, device=pad.device) if c.key_mask is None else c.key_mask
        masks.append(torch.cat([own, torch.zeros(batch, longest - length, dtype=torch.bool, device=pad.device)], dim=1))
    return Condition(torch.cat(states), torch.cat([c.context_latents for c in conditions]), key_mask=torch.cat(masks))


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


def repaint_injection(x: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor, t_next: float,
                      noise: torch.Tensor) -> torch.Tensor:
    """Outside the span (mask False) the clean source noised to `t_next`; inside, x."""
    renoised = t_next * noise + (1.0 - t_next) * clean
    return torch.where(mask[..., None].expand_as(x), x, renoised)


def clamp_velocity(v: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale each item's velocity down so that its norm (over time and channels) is at most
    `threshold` times the latents' norm."""
    v_norm = v.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-10
    x_norm = x.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-10
    return v * torch.clamp(threshold * x_norm / v_norm, max=1.0)


ProgressFn = Callable[[int, int], None]


class _Velocity:
    """The decoder's (guided) velocity at one point, under the phase's condition."""

    def __init__(self, model: AceStepDiT, guidance: Guidance | None):
        self.model, self.guidance = model, guidance
        self.guided = guidance is not None and guidance.enabled
        self.momentum = MomentumBuffer(guidance.apg_momentum) if guidance is not None else None

    def __call__(self, x: torch.Tensor, t: float, condition: Condition, corrector: bool = False) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.guided else x
        t_batch = torch.full((x_in.shape[0],), t, dtype=x.dtype, device=x.device)
        v = self.model.decoder(x_in, t_batch, t_batch, None, condition.context_latents, cache=condition.cached(self.model))
        if not self.guided:
            return v
        cond, uncond = v.chunk(2)
        g = self.guidance
        if not g.applies_at(t):
            return cond
        if g.use_adg and t > 0:  # ADG divides by t: at t = 0 (a base Heun corrector) plain CFG
            return adg(x, cond, uncond, t, g.scale, g.adg_angle_clip)
        if corrector:
            return cfg(cond, uncond, g.scale)
        return apg(cond, uncond, g.scale, self.momentum, g.apg_norm_threshold, g.apg_eta)


def sample(
    model: AceStepDiT,
    cover: Condition,
    noise: torch.Tensor,
    *,
    timesteps: list[float],
    base: bool = False,
    non_cover: Condition | None = None,
    cover_steps: int | None = None,
    audio_cover_strength: float = 1.0,
    cover_noise_strength: float = 0.0,
    src_latents: torch.Tensor | None = None,
    repaint_mask: torch.Tensor | None = None,
    clean_src_latents: torch.Tensor | None = None,
    repaint_crossfade_frames: int = 12,
    repaint_injection_ratio: float = 0.5,
    guidance: Guidance | None = None,
    sampling: Sampling = Sampling(),
    sde_noise: torch.Tensor | None = None,
    generator: torch.Generator | list[tuple[torch.Generator, int]] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """The sampling loop over `timesteps` (descending; turbo: 0 excluded, the last step goes to 0;
    base: every point, the loop runs between consecutive ones). `noise` is x_T (already mixed with
    the retake noise). `cover` conditions the first `cover_steps` steps (default int(steps x
    audio_cover_strength)) and `non_cover` the rest. With cover_noise_strength > 0 sampling starts at
    the entry nearest to 1 - strength from that mix of noise and `src_latents`. Repaint re-injects
    the noised clean source outside `repaint_mask` after each of the first round(ratio x steps) steps
    (turbo: never after the last), then blends the span's edges over `repaint_crossfade_frames`.
    SDE re-noising draws from `sde_noise` [steps, B, T, C] when given (fixtures), else from
    `generator` (a list of (generator, rows): several jobs in one batch, each with its own). Base models (`base`) also run a Heun corrector, re-injection and an SDE draw on the
    last step. Returns x0 latents."""
    points = [float(t) for t in torch.tensor(timesteps, dtype=torch.float32).tolist()]  # held in float32
    if not base:
        points.append(0.0)
    steps = len(points) - 1
    if cover_steps is None:
        cover_steps = int(steps * audio_cover_strength)
    xt = noise
    if cover_noise_strength > 0.0:
        if src_latents is None:
            raise ValueError("cover_noise_strength needs src_latents")
        target = 1.0 - cover_noise_strength
        start = min(range(steps), key=lambda i: abs(points[i] - target))
        xt = points[start] * noise + (1 - points[start]) * src_latents
        points = points[start:]
        steps = len(points) - 1
        cover_steps = int(steps * audio_cover_strength)
    injection_steps = round(repaint_injection_ratio * steps)
    repainting = repaint_mask is not None and clean_src_latents is not None
    guided = guidance is not None and guidance.enabled
    if guided:
        null = model.null_condition_emb
        cover = cover.with_unconditional(null)
        non_cover = non_cover.with_unconditional(null) if non_cover is not None else None
    velocity_at = _Velocity(model, guidance)
    condition, previous_v = cover, None
    if progress is not None:
        progress(0, steps)  # the conditions are ready: a report (and a cancel point) before the first step
    for step in range(steps):
        t, t_next = points[step], points[step + 1]
        last = step == steps - 1
        if step >= cover_steps and non_cover is not None and condition is not non_cover:
            condition = non_cover
        v = velocity_at(xt, t, condition)
        if sampling.velocity_norm_threshold > 0:
            v = clamp_velocity(v, xt, sampling.velocity_norm_threshold)
        if sampling.velocity_ema_factor > 0 and previous_v is not None:
            v = (1 - sampling.velocity_ema_factor) * v + sampling.velocity_ema_factor * previous_v
        denoised = xt - v * t
        if sampling.infer_method == "sde":
            if last and not base:
                x_next = denoised
            else:
                level = 1.0 - (step + 1) / steps if base else t_next  # base: unshifted, as upstream
                if sde_noise is not None:
                    fresh = sde_noise[step].to(xt.device, xt.dtype)
                elif isinstance(generator, list):  # several jobs: each draws its rows from its own generator
                    fresh = torch.cat([torch.randn((rows, *denoised.shape[1:]), generator=g, device=xt.device,
                                                   dtype=xt.dtype) for g, rows in generator])
                else:
                    fresh = torch.randn(denoised.shape, generator=generator, device=xt.device, dtype=xt.dtype)
                x_next = level * fresh + (1 - level) * denoised
            step_v = v
        elif sampling.sampler_mode == "heun" and (base or not last):
            predicted = xt - v * (t - t_next)
            corrector = velocity_at(predicted, t_next, condition, corrector=True)
            step_v = (v + corrector) / 2
            x_next = xt - step_v * (t - t_next)
        else:
            step_v = v
            x_next = xt - v * (t - t_next)
        previous_v = step_v
        if sampling.dcw is not None:
            x_next = sampling.dcw.apply(x_next, denoised, t)
        if repainting and step < injection_steps and (base or not last):
            x_next = repaint_injection(x_next, clean_src_latents, repaint_mask, t_next, noise)
        xt = x_next
        if progress is not None:
            progress(step + 1, steps)
    if repainting and repaint_crossfade_frames > 0:
        xt = repaint_blend(xt, clean_src_latents, repaint_mask, repaint_crossfade_frames)
    return xt


def schedule_for(base: bool, infer_steps: int | None, shift: float, timesteps: list[float] | None,
                 audio_cover_strength: float = 1.0) -> tuple[list[float], int | None]:
    """(the timesteps `sample` runs, the cover phase's steps or None for int(steps x strength)) of a
    model kind and the request's schedule options."""
    custom = [float(t) for t in timesteps] if timesteps is not None and len(timesteps) else None
    if base:
        steps = infer_steps if infer_steps is not None else TURBO_STEPS
        schedule = custom if custom is not None else base_schedule(steps, shift)
        # upstream main counts the cover phase on the infer_steps argument, even under custom timesteps
        return schedule, int(steps * audio_cover_strength)
    return (snap_timesteps(custom) if custom is not None else turbo_schedule(shift, infer_steps)), None


def retake_mix(noise: torch.Tensor, retake_noise: torch.Tensor | None, variance: float) -> torch.Tensor:
    """Retake: x_T = cos(v pi/2) noise + sin(v pi/2) retake_noise (unchanged without one or at v = 0)."""
    if retake_noise is None or variance <= 0:
        return noise
    angle = variance * math.pi / 2
    return math.cos(angle) * noise + math.sin(angle) * retake_noise.to(noise.dtype)


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
    infer_steps: int | None = None,
    shift: float = 3.0,
    timesteps: list[float] | None = None,
    audio_cover_strength: float = 1.0,
    non_cover_text_hidden_states=None,
    non_cover_text_attention_mask=None,
    precomputed_lm_hints_25Hz=None,
    audio_codes=None,
    cover_noise_strength: float = 0.0,
    repaint_mask=None,
    clean_src_latents=None,
    repaint_crossfade_frames: int = 12,
    repaint_injection_ratio: float = 0.5,
    guidance: Guidance | None = None,
    sampling: Sampling = Sampling(),
    retake_noise: torch.Tensor | None = None,
    retake_variance: float = 0.0,
    sde_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Generation with the reference's `generate_audio` arguments (x_T given instead of seeds).
    The model's config says turbo or base/SFT (schedule, last-step rules); `guidance` applies to
    base/SFT only. With audio_cover_strength < 1 the later steps use a text2music condition: the
    non-cover caption, the silence latent as source, the same chunk mask, no cover items. Retake:
    x_T = cos(v pi/2) noise + sin(v pi/2) retake_noise, which is also the repaint re-injection noise."""
    base = not model.config.turbo
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
    schedule, cover_steps = schedule_for(base, infer_steps, shift, timesteps, audio_cover_strength)
    return sample(
        model, cover, retake_mix(noise, retake_noise, retake_variance), timesteps=schedule, base=base, non_cover=non_cover, cover_steps=cover_steps,
        audio_cover_strength=audio_cover_strength, cover_noise_strength=cover_noise_strength, src_latents=src_latents,
        repaint_mask=repaint_mask, clean_src_latents=clean_src_latents,
        repaint_crossfade_frames=repaint_crossfade_frames, repaint_injection_ratio=repaint_injection_ratio,
        guidance=guidance, sampling=sampling, sde_noise=sde_noise, generator=generator, progress=progress,
    )
