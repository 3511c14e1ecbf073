"""Audio in and out of the pipeline, without torchaudio's compiled parts: any wav/flac/mp3/ogg to
float32 stereo at 48 kHz, and float32 stereo back to wav/flac/mp3 through soundfile."""

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from pipeline.contract import DURATION_MAX, SAMPLE_RATE

FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24"), "mp3": ("MP3", None)}
SILENCE = 1e-5
# The most audio `load_audio` decodes by default: twice the longest song a request may make, so a
# source of any accepted length fits, and a decompression bomb (a small file whose header claims
# hours) is cut here instead of filling memory.
MAX_DECODE_SECONDS = 2 * DURATION_MAX


class AudioError(Exception):
    """Audio that cannot be read, or output that must not be written (non-finite, silent)."""


def load_audio(source: bytes | Path, *, max_seconds: float | None = MAX_DECODE_SECONDS,
               start_seconds: float = 0.0, stop_seconds: float | None = None) -> np.ndarray:
    """Decode to float32 shaped (2, samples) at 48 kHz: mono is duplicated, extra channels dropped.
    Only the frames of [start_seconds, stop_seconds) are decoded, and never more than `max_seconds`
    of them: a header that claims hours (or 2^36 samples) costs a short read, not the memory it
    claims; a file that ends early gives what it holds."""
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as audio:
            rate, frames = audio.samplerate, audio.frames
            if rate <= 0:
                raise AudioError("not decodable audio: no sample rate")
            first = max(0, int(start_seconds * rate))
            last = frames if stop_seconds is None else min(frames, int(stop_seconds * rate))
            if max_seconds is not None:
                last = min(last, first + int(max_seconds * rate))
            if first > 0 and audio.seekable():
                audio.seek(min(first, frames))
            elif first > 0:
                audio.read(first, dtype="float32", always_2d=True)
            data = _read_frames(audio, max(0, last - first))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OverflowError, EOFError) as exc:
        raise AudioError(f"not decodable audio: {exc}") from None
    if data.shape[0] == 0:
        raise AudioError("the audio is empty")
    stereo = np.repeat(data, 2, axis=1) if data.shape[1] == 1 else data[:, :2]
    return resample(stereo.T, rate, SAMPLE_RATE)


def _read_frames(audio: soundfile.SoundFile, count: int, block: int = 1 << 20) -> np.ndarray:
    """Up to `count` frames, read a block at a time: memory follows the audio there is, not what a
    header claims (soundfile allocates a read's whole request up front)."""
    parts = []
    while count > 0:
        part = audio.read(min(block, count), dtype="float32", always_2d=True)
        if len(part) == 0:
            break
        parts.append(part)
        count -= len(part)
    return np.concatenate(parts) if parts else np.zeros((0, audio.channels), dtype=np.float32)


def resample(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited polyphase resampling along the last axis."""
    if source_rate == target_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    factor = gcd(source_rate, target_rate)
    out = resample_poly(audio, target_rate // factor, source_rate // factor, axis=-1)
    return out.astype(np.float32)


def encode_audio(audio: np.ndarray, sample_rate: int, fmt: str, path: Path) -> None:
    """Write (channels, samples) float audio; peak-normalised only if it clips. Non-finite or silent
    audio is an error, not a file."""
    if fmt not in FORMATS:
        raise AudioError(f"unknown output format {fmt!r}; one of {', '.join(FORMATS)}")
    if audio.ndim != 2 or not np.all(np.isfinite(audio)):
        raise AudioError("the generated audio is not finite")
    peak = float(np.max(np.abs(audio), initial=0.0))
    if peak <= SILENCE:
        raise AudioError("the generated audio is silent")
    samples = (audio / peak if peak > 1.0 else audio).T.astype(np.float32)
    container, subtype = FORMATS[fmt]
    soundfile.write(str(path), samples, sample_rate, format=container, subtype=subtype)
    if container == "WAV":
        _clear_peak_timestamp(path)


def _clear_peak_timestamp(path: Path) -> None:
    """Zero the time of writing that libsndfile stamps into a float WAV's PEAK chunk, so the same
    audio always encodes to the same bytes (reruns and retried attempts upload identical files).
    The RIFF chunks follow the 12-byte header; PEAK (before `data`) holds a version, then the stamp."""
    with path.open("r+b") as wav:
        header = wav.read(4096)
        offset = 12
        while offset + 8 <= len(header):
            chunk, size = header[offset:offset + 4], int.from_bytes(header[offset + 4:offset + 8], "little")
            if chunk == b"PEAK" and size >= 8:
                wav.seek(offset + 12)
                wav.write(bytes(4))
                return
            if chunk == b"data":
                return
            offset += 8 + size + (size & 1)
