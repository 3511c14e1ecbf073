"""A long (or bomb-like) source costs what the longest song does: the worker decodes and encodes no
more of it than any task can use."""

import numpy as np
import soundfile

from pipeline.contract import DURATION_MAX, GenerationRequest
from pipeline.service import load_pipeline


def test_a_source_longer_than_any_song_is_decoded_only_as_far_as_a_song_goes(tiny_checkpoints, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_checkpoints)
    rate = 1000  # a small file that still lasts longer than any song
    path = tmp_path / "long.flac"
    soundfile.write(path, np.zeros((rate * (DURATION_MAX + 300), 1), dtype=np.float32) + 0.01, rate)
    source = pipe.source(GenerationRequest(task_type="cover", src_audio_path=str(path), audio_duration=10))
    assert source.audio.shape[1] == DURATION_MAX * 48000  # 600 s decoded of 900
