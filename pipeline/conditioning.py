"""The conditioning the handler builds before the DiT runs: per-item chunk masks, spans, cover flags,
source latents and the repaint mask.

Behaviour (from tests/fixtures/dit-base/README.md, "The chunk mask" and "Source latents"):

* A span is the frame range ``[start, end)`` an item regenerates. repaint and lego items with a
  range get ``("repainting", start, end)``; every other item gets ``("full", 0, T)``. Seconds become
  frames with ``int(sec * 48000 // 1920)``; start is clamped to ``[0, T-1]`` and end to
  ``[start+1, T]``; an end of ``None`` or below 0 means the end of the latents.
* ``chunk_mask_mode`` "explicit" gives the 0/1 span. "auto" is meant as the sentinel 2.0 everywhere.
  Upstream main (6d467e4) writes that 2.0 into a bool tensor, so the mask is True everywhere and the
  span is lost (``auto_sentinel=False``, the default, reproduces this). PR #1290 (eae40da, closed, not
  merged) builds a float32 mask in which auto items hold 2.0 (``auto_sentinel=True``).
* Source latents: text2music takes the silence latent; repaint takes the source with the span frames
  replaced by the silence-latent frames at the same positions; lego keeps the source unchanged (its
  range only shapes ``repaint_mask``); extract, complete, cover and cover-nofsq take the source. An
  item whose waveform is silent (``abs().sum() <= 1e-6``) always takes the silence latent.
* ``is_covers`` is True for cover items, and for any item given precomputed audio-code hints (the
  model then replaces its src latents by the hints). cover-nofsq is not a cover: its raw source
  latents are the context.
* ``repaint_mask`` ([B, T] bool) exists when some item has a repaint/lego range: True inside the span;
  items without a range are True everywhere (all regenerated, nothing re-injected). Otherwise None.

Nothing here depends on the device or the float dtype: the latents keep the dtype and device of
``target_latents``; the masks live on the same device.
"""

from collections.abc import Sequence
from typing import Any

import torch

SAMPLE_RATE = 48000
HOP_LENGTH = 1920  # audio samples per latent frame (25 Hz)
SILENCE_THRESHOLD = 1e-6
AUTO_SENTINEL = 2.0

RANGE_TASKS = frozenset({"repaint", "lego"})  # a repaint range gives the span
BLANKING_TASKS = frozenset({"repaint"})  # the span is replaced by silence in src
SOURCE_TASKS = frozenset({"repaint", "lego", "extract", "complete", "cover", "cover-nofsq"})
COVER_TASKS = frozenset({"cover"})
TASKS = SOURCE_TASKS | {"text2music"}
MASK_MODES = frozenset({"auto", "explicit"})

Span = tuple[str, int, int]


def seconds_to_frame(seconds: float) -> int:
    """``int(sec * 48000 // 1920)``: floor of the frame the time falls in."""
    return int(float(seconds) * SAMPLE_RATE // HOP_LENGTH)


def span_frames(start_sec: float | None, end_sec: float | None, frames: int) -> tuple[int, int]:
    """Frame range ``[start, end)`` of a repaint range in seconds, clamped into ``frames`` latents.

    start None -> 0; end None or negative -> ``frames``. start is clamped to [0, frames-1], end to
    [start+1, frames], so the range is never empty."""
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    start = 0 if start_sec is None else seconds_to_frame(start_sec)
    end = frames if end_sec is None or end_sec < 0 else seconds_to_frame(end_sec)
    start = min(max(start, 0), frames - 1)
    end = min(max(end, start + 1), frames)
    return start, end


def _per_item(value: Any, batch_size: int, name: str) -> list:
    """A scalar (str, number, None) is shared by every item; a sequence must hold one per item."""
    if value is None or isinstance(value, (str, int, float)):
        return [value] * batch_size
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else [value.item()] * batch_size
    items = list(value)
    if len(items) != batch_size:
        raise ValueError(f"{name} has {len(items)} entries for a batch of {batch_size}")
    return items


def _silence_frames(silence_latent_tiled: torch.Tensor, frames: int, like: torch.Tensor | None) -> torch.Tensor:
    silence = silence_latent_tiled
    if silence.dim() == 3:
        if silence.shape[0] != 1:
            raise ValueError(f"silence_latent_tiled must be [T, C] or [1, T, C], got {tuple(silence.shape)}")
        silence = silence[0]
    if silence.dim() != 2:
        raise ValueError(f"silence_latent_tiled must be [T, C] or [1, T, C], got {tuple(silence.shape)}")
    if silence.shape[0] < frames:
        raise ValueError(f"silence_latent_tiled has {silence.shape[0]} frames; {frames} are needed")
    silence = silence[:frames]
    if like is not None:
        silence = silence.to(device=like.device, dtype=like.dtype)
    return silence


def _is_silent(target_wavs: torch.Tensor | Sequence | None, index: int) -> bool:
    if target_wavs is None:
        return True
    wav = target_wavs[index]
    if wav is None:
        return True
    return bool(wav.abs().sum() <= SILENCE_THRESHOLD)


def build_chunk_masks_and_src_latents(
    target_wavs: torch.Tensor | Sequence | None,
    target_latents: torch.Tensor | None,
    silence_latent_tiled: torch.Tensor,
    *,
    batch_size: int,
    max_latent_length: int,
    task_type: str | Sequence[str],
    repainting_start: float | Sequence[float | None] | None,
    repainting_end: float | Sequence[float | None] | None,
    chunk_mask_modes: str | Sequence[str] | None,
    audio_code_hints: Sequence[Any] | None = None,
    auto_sentinel: bool = False,
) -> tuple[torch.Tensor, list[Span], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``(chunk_masks [B, T], spans, is_covers [B] bool, src_latents [B, T, C], repaint_mask)``.

    ``target_wavs``: per item source waveform, only tested for silence (None: no source audio).
    ``target_latents``: [B, >=T, C] source latents (None: no source; every item takes silence).
    ``silence_latent_tiled``: [>=T, C] (or [1, >=T, C]) silence-latent frames 0..T-1.
    ``task_type``, ``repainting_start/end``, ``chunk_mask_modes``, ``audio_code_hints``: one value for
    the batch or one per item. ``chunk_masks`` is bool, or float32 with ``auto_sentinel`` (PR #1290).
    """
    frames = int(max_latent_length)
    if batch_size < 1 or frames < 1:
        raise ValueError(f"batch_size and max_latent_length must be positive ({batch_size}, {frames})")
    tasks = _per_item(task_type, batch_size, "task_type")
    unknown = sorted({str(t) for t in tasks} - TASKS)
    if unknown:
        raise ValueError(f"unknown task_type {unknown}; expected one of {sorted(TASKS)}")
    modes = [m if m is not None else "auto" for m in _per_item(chunk_mask_modes, batch_size, "chunk_mask_modes")]
    bad_modes = sorted({str(m) for m in modes} - MASK_MODES)
    if bad_modes:
        raise ValueError(f"unknown chunk_mask_mode {bad_modes}; expected 'auto' or 'explicit'")
    starts = _per_item(repainting_start, batch_size, "repainting_start")
    ends = _per_item(repainting_end, batch_size, "repainting_end")
    hints = _per_item(audio_code_hints, batch_size, "audio_code_hints") if audio_code_hints is not None \
        else [None] * batch_size

    if target_latents is not None:
        if target_latents.dim() != 3 or target_latents.shape[0] < batch_size:
            raise ValueError(f"target_latents must be [B, T, C] with B >= {batch_size}, "
                             f"got {tuple(target_latents.shape)}")
        like = target_latents
    else:
        like = None
    silence = _silence_frames(silence_latent_tiled, frames, like)
    device = silence.device
    source = None
    if target_latents is not None:
        source = target_latents[:batch_size, :frames]
        if source.shape[1] < frames:  # shorter source: the rest is silence
            tail = silence[source.shape[1]:].unsqueeze(0).expand(batch_size, -1, -1)
            source = torch.cat([source, tail], dim=1)

    spans: list[Span] = []
    span_rows = torch.zeros(batch_size, frames, dtype=torch.bool, device=device)
    has_range = [False] * batch_size
    rows = []
    for i in range(batch_size):
        task = tasks[i]
        if task in RANGE_TASKS and (starts[i] is not None or ends[i] is not None):
            start, end = span_frames(starts[i], ends[i], frames)
            spans.append(("repainting", start, end))
            has_range[i] = True
        else:
            start, end = 0, frames
            spans.append(("full", 0, frames))
        span_rows[i, start:end] = True

        if source is None or task not in SOURCE_TASKS or _is_silent(target_wavs, i):
            row = silence
        elif task in BLANKING_TASKS and has_range[i]:
            inside = span_rows[i].unsqueeze(-1)
            row = torch.where(inside, silence, source[i])
        else:
            row = source[i]
        rows.append(row)
    src_latents = torch.stack(rows, dim=0)

    auto = torch.tensor([m == "auto" for m in modes], dtype=torch.bool, device=device).unsqueeze(1)
    if auto_sentinel:
        # PR #1290: float32 mask; explicit items 0/1, auto items the 2.0 sentinel.
        chunk_masks = torch.where(auto, torch.full_like(span_rows, AUTO_SENTINEL, dtype=torch.float32),
                                  span_rows.to(torch.float32))
    else:
        # Upstream main: 2.0 stored into a bool tensor is True, so auto items are True everywhere.
        chunk_masks = span_rows | auto

    is_covers = torch.tensor([t in COVER_TASKS or h is not None for t, h in zip(tasks, hints, strict=True)],
                             dtype=torch.bool, device=device)

    repaint_mask = None
    if any(has_range):
        ranged = torch.tensor(has_range, dtype=torch.bool, device=device).unsqueeze(1)
        repaint_mask = torch.where(ranged, span_rows, torch.ones_like(span_rows))
    return chunk_masks, spans, is_covers, src_latents, repaint_mask
