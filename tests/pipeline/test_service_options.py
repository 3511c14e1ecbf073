"""Issue 17 in the pipeline a worker runs (tiny checkpoints): the job's DiT, cover from codes sized by
the codes, upstream's post-processing after decode (normalisation, the repaint splice, fades), and
the analysis modes that answer with text."""

import numpy as np
import pytest

from pipeline.contract import SAMPLE_RATE, PipelineOptions
from pipeline.interface import PipelineError
from pipeline.service import load_pipeline, read_audio
from pipeline.tiny import TINY_DITS
from tests.pipeline.test_service import request, tone_file

PEAK_1DB = 10 ** (-1 / 20)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints, PipelineOptions(dit_models=TINY_DITS[1:]))


def run(pipe, **overrides):
    return pipe.run(request(**overrides), lambda *_, **__: None)


def test_a_job_runs_the_dit_it_names_and_the_worker_keeps_its_default(pipe, tmp_path):
    assert pipe.models[:3] == list(TINY_DITS)
    src = tone_file(tmp_path / "src.wav", 3.0)
    for model, task in (("acestep-v15-base", "lego"), ("acestep-v15-base", "extract"), ("acestep-v15-sft", "text2music")):
        out = run(pipe, model=model, task_type=task, src_audio_path=src, track_name="drums", inference_steps=3)
        assert out.info["dit_model"] == model and out.audios[0].shape == (2, 3 * SAMPLE_RATE)
    assert pipe.dit_name == "acestep-v15-turbo" and pipe.dit.config.turbo
    with pytest.raises(PipelineError, match="asks for the DiT acestep-v15-xl-base; this worker serves acestep-v15-turbo"):
        run(pipe, model="acestep-v15-xl-base")
    with pytest.raises(PipelineError, match="needs a base model"):
        run(pipe, model="acestep-v15-sft", task_type="complete", src_audio_path=src)


def test_base_options_change_the_audio(pipe):
    plain = run(pipe, model="acestep-v15-base", inference_steps=4).audios[0]
    for options in ({"use_adg": True}, {"cfg_interval_end": 0.8}, {"sampler_mode": "heun"}, {"infer_method": "sde"},
                    {"dcw_enabled": False}, {"timesteps": [1.0, 0.6, 0.3, 0.0]}, {"shift": 1.0}):
        other = run(pipe, model="acestep-v15-base", inference_steps=4, **options).audios[0]
        assert other.shape == plain.shape and not np.allclose(other, plain), options


def test_cover_from_codes_takes_the_codes_length(pipe, tmp_path):
    """The reference sizes a cover by its hints: neither the requested duration nor the source's length."""
    codes = "".join(f"<|audio_code_{(i * 7919) % 64000}|>" for i in range(15))
    src = tone_file(tmp_path / "src.wav", 4.0)
    out = run(pipe, task_type="cover", src_audio_path=src, audio_duration=10.0, audio_code_string=codes)
    assert out.audios[0].shape == (2, 3 * SAMPLE_RATE)  # 15 codes at 5 a second


def test_songs_are_normalised_to_the_requested_peak_up_or_down(pipe):
    assert np.abs(run(pipe).audios[0]).max() == pytest.approx(PEAK_1DB, abs=1e-5)
    assert np.abs(run(pipe, normalization_db=-6.0).audios[0]).max() == pytest.approx(10 ** (-6 / 20), abs=1e-5)
    raw = np.abs(run(pipe, enable_normalization=False).audios[0]).max()
    assert raw != pytest.approx(PEAK_1DB, abs=1e-3)  # the tiny VAE's raw level is something else


def test_fades_follow_normalisation(pipe):
    plain = run(pipe).audios[0]
    faded = run(pipe, fade_in_duration=1.0, fade_out_duration=0.5).audios[0]
    ramp_in, ramp_out = np.linspace(0, 1, SAMPLE_RATE), np.linspace(1, 0, SAMPLE_RATE // 2)
    assert np.allclose(faded[:, :SAMPLE_RATE], plain[:, :SAMPLE_RATE] * ramp_in, atol=1e-6)
    assert np.allclose(faded[:, -SAMPLE_RATE // 2:], plain[:, -SAMPLE_RATE // 2:] * ramp_out, atol=1e-6)
    assert np.array_equal(faded[:, SAMPLE_RATE:-SAMPLE_RATE // 2], plain[:, SAMPLE_RATE:-SAMPLE_RATE // 2])


def test_repaint_splices_the_source_back_outside_the_window(pipe, tmp_path):
    src_path = tone_file(tmp_path / "src.wav", 4.0)
    source = read_audio(src_path, "source")
    crossfade = int(0.025 * SAMPLE_RATE)  # balanced, strength 0.5: 0.05 x (1 - 0.5) s
    out = run(pipe, task_type="repaint", src_audio_path=src_path, repainting_start=1.0, repainting_end=2.0,
              enable_normalization=False).audios[0]
    left, right = SAMPLE_RATE - crossfade, 2 * SAMPLE_RATE + crossfade
    assert np.abs(out[:, :left] - source[:, :left]).max() < 1e-6
    assert np.abs(out[:, right:] - source[:, right:]).max() < 1e-6
    assert np.abs(out[:, SAMPLE_RATE:2 * SAMPLE_RATE] - source[:, SAMPLE_RATE:2 * SAMPLE_RATE]).max() > 1e-3
    aggressive = run(pipe, task_type="repaint", src_audio_path=src_path, repainting_start=1.0, repainting_end=2.0,
                     enable_normalization=False, repaint_mode="aggressive").audios[0]
    assert np.abs(aggressive[:, :left] - source[:, :left]).max() > 1e-3  # no splice: the VAE's own audio


def test_extract_codes_and_analysis_without_an_lm(pipe, tmp_path):
    src = tone_file(tmp_path / "src.wav", 4.0)
    out = run(pipe, extract_codes_only=True, src_audio_path=src)
    assert out.audios == [] and out.info["status_message"] == "Audio Codes Extraction Success"
    assert out.info["audio_codes"].count("<|audio_code_") == 4 * 5
    assert run(pipe, extract_codes_only=True, src_audio_path=src).info["audio_codes"] == out.info["audio_codes"]
    with pytest.raises(PipelineError, match="full_analysis_only needs a 5 Hz LM"):
        run(pipe, full_analysis_only=True, src_audio_path=src)
    with pytest.raises(PipelineError, match="analysis_only needs a 5 Hz LM"):
        run(pipe, analysis_only=True)


def test_a_silent_reference_or_source_counts_as_none(pipe, tmp_path):
    """upstream's is_silence (every |sample| < 1e-6): a silent reference is not used (the silence
    latent, as without one) and a silent cover source takes the silence latent, not its encoding."""
    import soundfile

    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros((SAMPLE_RATE * 3, 2), dtype=np.float32), SAMPLE_RATE)
    plain = run(pipe).audios[0]
    assert np.array_equal(run(pipe, reference_audio_path=str(silent)).audios[0], plain)
    assert pipe.source(request(task_type="cover", src_audio_path=str(silent))).latents is None
    assert run(pipe, task_type="cover", src_audio_path=str(silent), audio_duration=None).audios[0].shape == (2, 3 * SAMPLE_RATE)
