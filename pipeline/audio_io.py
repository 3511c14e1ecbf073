"""Audio in and out of the pipeline, without torchaudio's compiled parts: any wav/flac/mp3/ogg to
float32 stereo at 48 kHz, and float32 stereo back to wav/flac/mp3 through soundfile."""

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from pipeline.contract import SAMPLE_RATE

FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24"), "mp3": ("MP3", None)}
SILENCE = 1e-5


class AudioError(Exception):
    """Audio that cannot be read, or output that must not be written (non-finite, silent)."""


def load_audio(source: bytes | Path) -> np.ndarray:
    """Decode to float32 shaped (2, samples) at 48 kHz: mono is duplicated, extra channels dropped."""
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"not decodable audio: {exc}") from None
    if data.shape[0] == 0:
        raise AudioError("the audio is empty")
    stereo = np.repeat(data, 2, axis=1) if data.shape[1] == 1 else data[:, :2]
    return resample(stereo.T, rate, SAMPLE_RATE)


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
