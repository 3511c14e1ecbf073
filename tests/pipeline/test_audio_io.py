"""Audio in and out: every input format to stereo 48 kHz, resampling that keeps the pitch, and
output that refuses broken audio."""

import io

import numpy as np
import pytest
import soundfile

from pipeline.audio_io import AudioError, encode_audio, load_audio, resample


def tone(rate: int, seconds: float, channels: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


def encoded(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def peak_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "MP3", "OGG"])
@pytest.mark.parametrize("rate,channels", [(48000, 2), (44100, 1), (22050, 2), (32000, 1)])
def test_any_input_becomes_stereo_48k_at_the_same_pitch(fmt, rate, channels):
    audio = load_audio(encoded(tone(rate, 2.0, channels), rate, fmt))
    assert audio.dtype == np.float32 and audio.shape[0] == 2
    assert abs(audio.shape[1] - 96000) <= 2400  # mp3/ogg pad a little; 2 s either way
    assert peak_frequency(audio[0], 48000) == pytest.approx(440.0, abs=2.0)
    np.testing.assert_allclose(audio[0], audio[1], atol=1e-3)


def test_resample_length_is_exact_for_pcm():
    assert resample(np.zeros((2, 44100), np.float32), 44100).shape == (2, 48000)
    same = np.random.default_rng(0).standard_normal((2, 480)).astype(np.float32)
    assert np.array_equal(resample(same, 48000), same)


def test_undecodable_and_empty_inputs_are_errors():
    with pytest.raises(AudioError, match="not decodable"):
        load_audio(b"definitely not audio" * 50)
    with pytest.raises(AudioError, match="empty"):
        load_audio(encoded(np.zeros((0, 2), np.float32), 48000, "WAV"))


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_encode_round_trips(tmp_path, fmt):
    audio = tone(48000, 1.0, 2).T
    path = tmp_path / f"out.{fmt}"
    encode_audio(audio, 48000, fmt, path)
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2)
    assert peak_frequency(load_audio(path)[0], 48000) == pytest.approx(440.0, abs=2.0)


def test_clipping_output_is_normalised_and_broken_output_refused(tmp_path):
    loud = tone(48000, 0.5, 2).T * 10
    encode_audio(loud, 48000, "wav", tmp_path / "loud.wav")
    assert np.max(np.abs(soundfile.read(str(tmp_path / "loud.wav"))[0])) <= 1.0 + 1e-6
    with pytest.raises(AudioError, match="not finite"):
        encode_audio(np.full((2, 100), np.nan, np.float32), 48000, "wav", tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="silent"):
        encode_audio(np.zeros((2, 100), np.float32), 48000, "wav", tmp_path / "silent.wav")
    with pytest.raises(AudioError, match="format"):
        encode_audio(tone(48000, 0.1, 2).T, 48000, "aac", tmp_path / "x.aac")
    assert not (tmp_path / "nan.wav").exists() and not (tmp_path / "silent.wav").exists()


def _peak_timestamp(wav: bytes) -> int:
    """The time-of-writing field of a WAV's PEAK chunk (libsndfile writes one for float WAV)."""
    offset = wav.index(b"PEAK")
    return int.from_bytes(wav[offset + 12:offset + 16], "little")


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_the_same_audio_encodes_to_the_same_bytes(tmp_path, fmt):
    audio = tone(48000, 0.5, 2).T
    encode_audio(audio, 48000, fmt, tmp_path / f"first.{fmt}")
    encode_audio(audio, 48000, fmt, tmp_path / f"again.{fmt}")
    first = (tmp_path / f"first.{fmt}").read_bytes()
    assert first == (tmp_path / f"again.{fmt}").read_bytes()
    if fmt == "wav":  # no clock in the file: a rerun in another second gives the same bytes too
        assert _peak_timestamp(first) == 0
        np.testing.assert_array_equal(soundfile.read(io.BytesIO(first), dtype="float32")[0], audio.T)
