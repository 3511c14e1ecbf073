"""Waveform post-processing around the VAE, as the reference (ACE-Step 1.5 at 6d467e4) does it.

Pure torch functions, one per reference function; written from the audio-post fixture's
descriptions (tests/fixtures/audio-post), not from the reference's code. Serving order after decode
(`postprocess_audio`): clip guard -> repaint splice -> peak normalisation per item -> fades.
"""

from collections.abc import Sequence

import torch

SERVING_SAMPLE_RATE = 48000
SILENCE_THRESHOLD = 1e-6  # compared in the audio's dtype (float32), as the reference does
NORMALIZE_MIN_PEAK = 1e-6
LATENT_CROSSFADE_FRAMES = 25  # repaint latent crossfade at strength 0 (and in conservative mode)
WAV_CROSSFADE_SEC = 0.05  # repaint waveform crossfade at strength 0 (and in conservative mode)


def _span_samples(start_sec: float, end_sec: float, sample_rate: int, length: int) -> tuple[int, int]:
    start = min(max(int(float(start_sec) * sample_rate), 0), length)
    end = min(max(int(float(end_sec) * sample_rate), 0), length)
    return start, end


def crossfade_mask(length: int, start: int, end: int, crossfade_samples: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 on [start, end), 0 elsewhere, linear ramps of `crossfade_samples` on both sides, cut at the edges.

    The fixture shows a ramp cut at the start of the signal rebuilt over the remaining samples; the
    ramp after the span is treated the same way (no fixture case cuts it at the end of the signal).

    Mirrors `_build_waveform_crossfade_mask` (acestep/core/generation/handler/repaint_waveform_splice.py).
    """
    mask = torch.zeros(length, dtype=dtype)
    mask[start:end] = 1.0
    n = max(int(crossfade_samples), 0)
    if n > 0:
        # A ramp cut by a signal edge is rebuilt over the samples that remain (k of them), so it
        # still runs from just above 0 to just below 1: linspace(0, 1, k + 2)[1:-1].
        lo = max(start - n, 0)
        if lo < start:
            mask[lo:start] = torch.linspace(0.0, 1.0, start - lo + 2, dtype=dtype)[1:-1]
        hi = min(end + n, length)
        if end < hi:
            mask[end:hi] = torch.linspace(1.0, 0.0, hi - end + 2, dtype=dtype)[1:-1]
    return mask


def repaint_masks(pred: torch.Tensor, src: torch.Tensor, starts_sec: Sequence[float], ends_sec: Sequence[float],
                  sample_rate: int, crossfade_sec: float) -> torch.Tensor:
    """Per-item splice masks [B, min_len] (debug helper; also for items the splice leaves as they are)."""
    length = min(pred.shape[-1], src.shape[-1])
    n = int(float(crossfade_sec) * sample_rate)
    masks = [crossfade_mask(length, *_span_samples(s, e, sample_rate, length), n, dtype=pred.dtype)
             for s, e in zip(starts_sec, ends_sec, strict=True)]
    return torch.stack(masks) if masks else torch.zeros(0, length, dtype=pred.dtype)


def repaint_splice(pred: torch.Tensor, src: torch.Tensor, starts_sec: Sequence[float], ends_sec: Sequence[float],
                   sample_rate: int, crossfade_sec: float) -> torch.Tensor:
    """Put the source back outside each item's repaint span: m*pred + (1-m)*src over min_len samples.

    pred, src: [B, C, S]. An item whose span covers everything (start 0, end >= min_len) is left as
    is; samples of pred beyond src's length are kept unchanged. Mirrors
    `apply_repaint_waveform_splice` (acestep/core/generation/handler/repaint_waveform_splice.py).
    """
    if len(starts_sec) != pred.shape[0] or len(ends_sec) != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} items, {len(starts_sec)} starts, {len(ends_sec)} ends")
    length = min(pred.shape[-1], src.shape[-1])
    masks = repaint_masks(pred, src, starts_sec, ends_sec, sample_rate, crossfade_sec)
    out = pred.clone()
    src = src.to(pred.dtype)
    for b, (s, e) in enumerate(zip(starts_sec, ends_sec, strict=True)):
        start, end = _span_samples(s, e, sample_rate, length)
        if start == 0 and end >= length:
            continue
        m = masks[b]
        out[b, :, :length] = m * pred[b, :, :length] + (1.0 - m) * src[b, :, :length]
    return out


def normalize_peak(audio: torch.Tensor, target_db: float = -1.0) -> torch.Tensor:
    """Scale so that the peak over all channels and samples is target_db dBFS (up or down).

    A peak below 1e-6 (compared in the audio's dtype) returns the input unchanged. Mirrors
    `normalize_audio` (acestep/audio_utils.py).
    """
    peak = audio.abs().max()
    if bool(peak < NORMALIZE_MIN_PEAK):
        return audio
    gain = 10.0 ** (float(target_db) / 20.0) / peak  # a tensor of the audio's dtype
    return audio * gain


def clip_guard(wavs: torch.Tensor) -> torch.Tensor:
    """After decode: float32; if any item's peak exceeds 1, every item is divided by max(its peak, 1).

    Mirrors the lines after VAE decode in `GenerateMusicDecodeMixin._decode_generate_music_pred_latents`
    (acestep/core/generation/handler/generate_music_decode.py).
    """
    wavs = wavs.float()
    if wavs.numel() == 0:
        return wavs
    peaks = wavs.abs().amax(dim=tuple(range(1, wavs.dim())), keepdim=True)
    if bool((peaks > 1.0).any()):
        wavs = wavs / peaks.clamp(min=1.0)
    return wavs


def postprocess_latents(latents: torch.Tensor, latent_shift: float = 0.0, latent_rescale: float = 1.0) -> torch.Tensor:
    """Before decode: refuse NaN/Inf or all-zero latents, then x*rescale + shift unless both are defaults.

    Mirrors `GenerateMusicDecodeMixin._prepare_generate_music_decode_state`
    (acestep/core/generation/handler/generate_music_decode.py).
    """
    finite = torch.isfinite(latents)
    if not bool(finite.all()):
        nan = int(torch.isnan(latents).sum())
        inf = int(torch.isinf(latents).sum())
        raise RuntimeError(
            f"Generation produced NaN or Inf latents (shape={list(latents.shape)}, dtype={latents.dtype}, "
            f"device={latents.device}, nan={nan}, inf={inf})."
        )
    if not bool((latents != 0).any()):
        raise RuntimeError(
            "Generation produced zero latents. This usually indicates a checkpoint/config mismatch or "
            "unsupported setup."
        )
    if latent_shift != 0.0 or latent_rescale != 1.0:
        latents = latents * latent_rescale + latent_shift
    return latents


def fade_samples(seconds: float, sample_rate: int = SERVING_SAMPLE_RATE) -> int:
    """Fade length in samples: round(seconds * sample_rate), as inference.generate_music passes it."""
    return int(round(float(seconds) * sample_rate))


def apply_fade(audio: torch.Tensor, fade_in_samples: int, fade_out_samples: int) -> torch.Tensor:
    """Linear fade-in over the first n samples (linspace(0, 1, n)) and fade-out over the last
    (linspace(1, 0, n)), each at most the signal length; 0 disables. Mirrors `apply_fade`
    (acestep/audio_utils.py)."""
    out = audio.clone()
    length = out.shape[-1]
    n_in = min(max(int(fade_in_samples), 0), length)
    n_out = min(max(int(fade_out_samples), 0), length)
    if n_in > 0:
        out[..., :n_in] = out[..., :n_in] * torch.linspace(0.0, 1.0, n_in, dtype=out.dtype, device=out.device)
    if n_out > 0:
        out[..., length - n_out:] = out[..., length - n_out:] * torch.linspace(
            1.0, 0.0, n_out, dtype=out.dtype, device=out.device)
    return out


def is_silence(audio: torch.Tensor) -> bool:
    """True iff every |sample| < 1e-6 (in the audio's dtype). Mirrors `MemoryUtilsMixin.is_silence`
    (acestep/core/generation/handler/memory_utils.py)."""
    return bool((audio.abs() < SILENCE_THRESHOLD).all())


def to_stereo_48k(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Input audio [C, S] -> [2, S'] at 48 kHz clamped to [-1, 1]: mono duplicated, channels past 2 dropped.

    Mirrors `IoAudioMixin._normalize_audio_to_stereo_48k` (acestep/core/generation/handler/io_audio.py).
    Deviation: the reference resamples with torchaudio; here another rate is resampled by linear
    interpolation (torch only). The fixture records only 48 kHz input, so that path is unchecked.
    """
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    if audio.shape[0] == 1:
        audio = audio.repeat(2, 1)
    elif audio.shape[0] > 2:
        audio = audio[:2]
    if int(sample_rate) != SERVING_SAMPLE_RATE:
        new_len = max(int(round(audio.shape[-1] * SERVING_SAMPLE_RATE / int(sample_rate))), 1)
        audio = torch.nn.functional.interpolate(audio.unsqueeze(0), size=new_len, mode="linear",
                                                align_corners=False).squeeze(0)
    return audio.clamp(-1.0, 1.0)


def padding_info(batch_size: int, src_audio: torch.Tensor, repainting_start: float, repainting_end: float | None,
                 sample_rate: int = SERVING_SAMPLE_RATE) -> tuple[torch.Tensor, list[float], list[float]]:
    """Repaint/lego outpainting: (target_wavs [B, 2, S'], repainting_start_batch, repainting_end_batch).

    End None or < 0 means the source duration; a negative start pads int(-start*sr) zeros on the left,
    an end past the duration int((end - duration)*sr) zeros on the right; the range is shifted by the
    left pad. Mirrors `PaddingMixin.prepare_padding_info` (acestep/core/generation/handler/padding_utils.py)
    for a repaint/lego request with source audio.
    """
    duration = src_audio.shape[-1] / sample_rate
    start = float(repainting_start)
    end = duration if repainting_end is None or repainting_end < 0 else float(repainting_end)
    left_sec = max(0.0, -start)
    right_sec = max(0.0, end - duration)
    left, right = int(left_sec * sample_rate), int(right_sec * sample_rate)
    wav = src_audio
    if left or right:
        wav = torch.nn.functional.pad(src_audio, (left, right))
    start, end = start + left_sec, end + left_sec
    target = wav.unsqueeze(0).repeat(batch_size, *([1] * wav.dim()))
    return target, [start] * batch_size, [end] * batch_size


def repaint_config(mode: str, strength: float) -> tuple[float, int, float]:
    """repaint_mode/strength -> (injection_ratio, latent_crossfade_frames, wav_crossfade_sec).

    strength clamped to [0, 1]; aggressive (0, 0, 0); conservative (1, 25, 0.05); anything else is
    balanced (1 - s, round(25 (1 - s)) half-to-even, 0.05 (1 - s)). Mirrors `_resolve_repaint_config`
    (acestep/core/generation/handler/generate_music.py).
    """
    s = min(max(float(strength), 0.0), 1.0)
    if mode == "aggressive":
        return 0.0, 0, 0.0
    if mode == "conservative":
        return 1.0, LATENT_CROSSFADE_FRAMES, WAV_CROSSFADE_SEC
    keep = 1.0 - s
    return keep, int(round(LATENT_CROSSFADE_FRAMES * keep)), WAV_CROSSFADE_SEC * keep


def postprocess_audio(wavs: torch.Tensor, *, repaint: tuple | None = None, normalize: bool = True,
                      normalization_db: float = -1.0, fade_in: float = 0.0, fade_out: float = 0.0,
                      sample_rate: int = SERVING_SAMPLE_RATE) -> torch.Tensor:
    """Serving order after decode for a batch [B, C, S]: clip guard -> splice (when `repaint` =
    (src_wavs, starts_sec, ends_sec, crossfade_sec) is given) -> per-item peak normalisation (when
    `normalize` and normalization_db <= 0) -> per-item fades (fade_in/fade_out in seconds).

    The caller passes `repaint` only for repaint/lego requests with a range and a mode other than
    aggressive (see `repaint_config` for the crossfade).
    """
    out = clip_guard(wavs)
    if repaint is not None:
        src, starts, ends, crossfade_sec = repaint
        out = repaint_splice(out, src, starts, ends, sample_rate, crossfade_sec)
    n_in, n_out = fade_samples(fade_in, sample_rate), fade_samples(fade_out, sample_rate)
    do_norm = normalize and normalization_db <= 0
    if not do_norm and n_in == 0 and n_out == 0:
        return out
    items = []
    for item in out:
        if do_norm:
            item = normalize_peak(item, normalization_db)
        if n_in or n_out:
            item = apply_fade(item, n_in, n_out)
        items.append(item)
    return torch.stack(items)
