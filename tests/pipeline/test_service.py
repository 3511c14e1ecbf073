"""The whole pipeline on tiny random checkpoints: lengths, task types, batches, seeds, errors."""

import numpy as np
import pytest
import soundfile
import torch

from pipeline.audio_io import SAMPLE_RATE
from pipeline.contract import GenerationRequest, PipelineOptions
from pipeline.interface import PipelineError
from pipeline.service import load_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints)


def request(**overrides):
    base = dict(caption="a calm piano piece", lyrics="[inst]", vocal_language="en", batch_size=1, audio_duration=3.0,
                use_random_seed=False, seed=7, inference_steps=8, guidance_scale=7.0, task_type="text2music",
                audio_format="wav", audio_cover_strength=1.0, thinking=False)
    # Built without the API's limits: the pipeline runs 3 s songs (fast tests) that HTTP would refuse.
    return GenerationRequest.model_construct(**(base | overrides))


def tone_file(path, seconds: float, rate: int = 44100):
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return str(path)


def run(pipe, **overrides):
    stages = []
    out = pipe.run(request(**overrides), lambda stage, fraction, **facts: stages.append((stage, fraction)))
    return out, stages


@pytest.mark.parametrize("seconds", [3.0, 4.37])
def test_requested_seconds_give_exactly_that_many_samples(pipe, seconds):
    out, stages = run(pipe, audio_duration=seconds)
    assert [a.shape for a in out.audios] == [(2, round(seconds * SAMPLE_RATE))]
    assert out.audios[0].dtype == np.float32 and np.isfinite(out.audios[0]).all()
    assert {"dit", "vae"} <= {s for s, _ in stages} and [f for _, f in stages] == sorted(f for _, f in stages)


def test_same_seed_same_audio_and_batch_items_get_their_own_seeds(pipe):
    first, _ = run(pipe, batch_size=2, seed=1234)
    again, _ = run(pipe, batch_size=2, seed=1234)
    other, _ = run(pipe, batch_size=1, seed=99)
    assert first.info["seed_value"] == "1234,1235"
    assert all(np.array_equal(a, b) for a, b in zip(first.audios, again.audios, strict=True))
    assert not np.array_equal(first.audios[0], first.audios[1])
    assert not np.array_equal(first.audios[0], other.audios[0])
    single, _ = run(pipe, batch_size=1, seed=1235)  # item 1 of the batch is reproducible on its own
    assert np.allclose(single.audios[0], first.audios[1], atol=1e-4)


def test_random_seeds_are_reported(pipe):
    out, _ = run(pipe, use_random_seed=True, batch_size=2)
    seeds = [int(s) for s in out.info["seed_value"].split(",")]
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)


def test_cover_uses_the_source_length_and_strength(pipe, tmp_path):
    src = tone_file(tmp_path / "src.wav", 2.5)
    out, _ = run(pipe, task_type="cover", audio_duration=None, src_audio_path=src, audio_cover_strength=0.5)
    assert out.audios[0].shape == (2, 2.5 * SAMPLE_RATE)
    full, _ = run(pipe, task_type="cover", audio_duration=None, src_audio_path=src)
    assert not np.array_equal(out.audios[0], full.audios[0])


def test_repaint_keeps_the_length_and_outpaints(pipe, tmp_path):
    src = tone_file(tmp_path / "src.wav", 4.0)
    inside, _ = run(pipe, task_type="repaint", src_audio_path=src, repainting_start=1.0, repainting_end=2.0)
    assert inside.audios[0].shape == (2, 4 * SAMPLE_RATE)
    outpaint, _ = run(pipe, task_type="repaint", src_audio_path=src, repainting_start=-1.0, repainting_end=5.0)
    assert outpaint.audios[0].shape == (2, 6 * SAMPLE_RATE)


def test_reference_audio_changes_the_timbre_condition(pipe, tmp_path):
    ref = tone_file(tmp_path / "ref.flac", 2.0, rate=22050)
    plain, _ = run(pipe)
    styled, _ = run(pipe, reference_audio_path=ref)
    assert styled.audios[0].shape == plain.audios[0].shape and not np.array_equal(styled.audios[0], plain.audios[0])


def test_a_short_silence_latent_is_repeated_to_every_length_the_dit_needs(pipe):
    silence = pipe.silence  # the tiny build stores 2 s of it; the timbre window alone takes 30 s
    frames = pipe.dit.config.timbre_fix_frame
    assert silence.shape[1] < frames
    repeated = pipe.silence_frames(frames)
    assert repeated.shape == (1, frames, silence.shape[2])
    assert torch.equal(repeated[:, silence.shape[1]:2 * silence.shape[1]], silence)


def test_audio_codes_drive_a_cover(pipe):
    codes = "".join(f"<|audio_code_{(i * 7919) % 64000}|>" for i in range(15))
    out, _ = run(pipe, audio_duration=None, audio_code_string=codes)
    assert out.audios[0].shape == (2, 3 * SAMPLE_RATE)  # 15 codes at 5 per second
    with pytest.raises(PipelineError, match="codes; 25 .* are needed"):
        run(pipe, audio_duration=5.0, audio_code_string=codes)


def test_input_errors_are_clear(pipe, tmp_path):
    short = tone_file(tmp_path / "short.wav", 0.3)
    with pytest.raises(PipelineError, match="source audio is 0.30 s long; at least 1 s"):
        run(pipe, task_type="cover", src_audio_path=short)
    src = tone_file(tmp_path / "src.wav", 5.0)
    with pytest.raises(PipelineError, match=r"repaint window \[7, 9\] s must overlap the 5.00 s"):
        run(pipe, task_type="repaint", src_audio_path=src, repainting_start=7.0, repainting_end=9.0)
    with pytest.raises(PipelineError, match="needs source audio"):
        run(pipe, task_type="repaint")
    with pytest.raises(PipelineError, match="thinking=true needs a 5 Hz LM"):
        run(pipe, thinking=True)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(PipelineError, match="source audio: not decodable"):
        run(pipe, task_type="cover", src_audio_path=str(tmp_path / "bad.wav"))


def test_base_checkpoint_samples_with_guidance(tmp_path, tiny_checkpoints):
    import shutil

    from pipeline.tiny import build_tiny_dit
    from pipeline.vae import Vae

    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, root, ignore=shutil.ignore_patterns("acestep-v15-turbo"))
    build_tiny_dit(root / "acestep-v15-base", Vae.load(root / "vae"), turbo=False)
    base = load_pipeline(root, PipelineOptions(dit_model="acestep-v15-base"))
    assert not base.dit.config.turbo
    calls = []
    out = base.run(request(inference_steps=5), lambda s, f, **facts: calls.append(f))
    assert out.audios[0].shape == (2, 3 * SAMPLE_RATE) and out.info["dit_model"] == "acestep-v15-base"
    assert len(calls) >= 5


@pytest.fixture(scope="module")
def pipe_with_lm(tiny_checkpoints, tmp_path_factory):
    import shutil

    from pipeline.tiny import TINY_LM
    from pipeline.tiny_text import build_tiny_lm

    root = tmp_path_factory.mktemp("with-lm")
    shutil.copytree(tiny_checkpoints, root, dirs_exist_ok=True)
    build_tiny_lm(root / TINY_LM)
    return load_pipeline(root, PipelineOptions(lm_max_duration=12))  # whatever the random LM plans stays short


@pytest.fixture
def short_lm_captions(monkeypatch):
    from pipeline.lm import decoding

    monkeypatch.setattr(decoding, "MAX_CAPTION_TOKENS", 16)


def test_thinking_runs_lm_codes_into_a_cover(pipe_with_lm, short_lm_captions):
    out, stages = run(pipe_with_lm, thinking=True, audio_duration=3.0, bpm=None, batch_size=2, lm_backend="pt")
    assert [a.shape for a in out.audios] == [(2, 3 * SAMPLE_RATE)] * 2
    assert out.info["lm_model"] == "acestep-5Hz-lm-0.6B" and "cover" in out.info["generation_info"]
    assert out.info["lm_backend"] == "pt"
    assert 30 <= out.info["bpm"] <= 300 and out.info["keyscale"] and out.info["timesignature"] in ("2", "3", "4", "6")
    assert "lm" in {s for s, _ in stages}
    again, _ = run(pipe_with_lm, thinking=True, audio_duration=3.0, bpm=None, batch_size=2, lm_backend="pt")
    assert all(np.array_equal(a, b) for a, b in zip(out.audios, again.audios, strict=True))  # same seed, same song


def test_vllm_request_without_vllm_runs_on_pt_with_one_warning(pipe_with_lm, short_lm_captions, monkeypatch, caplog):
    from pipeline.lm import loading

    monkeypatch.setattr(pipe_with_lm, "engines", loading.VllmEngines())
    with caplog.at_level("WARNING", logger="pipeline.lm.loading"):
        on_vllm, _ = run(pipe_with_lm, thinking=True, audio_duration=3.0, bpm=None, batch_size=1, lm_backend="vllm")
        run(pipe_with_lm, thinking=True, audio_duration=3.0, bpm=None, batch_size=1, lm_backend="vllm")
    on_pt, _ = run(pipe_with_lm, thinking=True, audio_duration=3.0, bpm=None, batch_size=1, lm_backend="pt")
    assert np.array_equal(on_vllm.audios[0], on_pt.audios[0]) and on_vllm.info["lm_backend"] == "pt"
    assert caplog.text.count("lm_backend=vllm for acestep-5Hz-lm-0.6B: vllm cannot start") == 1


def test_metadata_fill_keeps_user_values(pipe_with_lm, short_lm_captions):
    out, _ = run(pipe_with_lm, thinking=False, audio_duration=None, bpm=77, key_scale="", time_signature="3/4")
    assert out.info["bpm"] == 77 and out.info["timesignature"] == "3/4" and out.info["keyscale"]
    assert 10 <= out.info["duration"] <= 12 and out.audios[0].shape[1] == round(out.info["duration"] * SAMPLE_RATE)
    everything, _ = run(pipe_with_lm, thinking=False, audio_duration=3.0, bpm=77, key_scale="C major", time_signature="4")
    assert "lm_model" not in everything.info  # nothing to fill: no LM call


def test_unknown_lm_is_a_clear_error(pipe_with_lm):
    with pytest.raises(PipelineError, match="'acestep-5Hz-lm-4B' is not loaded on this worker"):
        run(pipe_with_lm, thinking=True, lm_model_path="acestep-5Hz-lm-4B")
    assert pipe_with_lm.models == ["acestep-v15-turbo", "acestep-5Hz-lm-0.6B"]


@pytest.mark.parametrize("options, variable", [
    (PipelineOptions(dit_model="acestep-v15-xl-turbo"), "ACESTEP_DIT_MODEL=acestep-v15-xl-turbo: no such DiT"),
    (PipelineOptions(lm_models=("acestep-5Hz-lm-4B",)), "ACESTEP_LM_MODELS: no 5 Hz LM acestep-5Hz-lm-4B"),
    (PipelineOptions(lm_model="acestep-5Hz-lm-4B"), "ACESTEP_LM_MODEL: no 5 Hz LM acestep-5Hz-lm-4B"),
])
def test_a_model_the_checkpoints_lack_fails_setup_naming_the_variable(tiny_checkpoints, options, variable):
    with pytest.raises(PipelineError, match=variable) as failed:
        load_pipeline(tiny_checkpoints, options)
    assert "there: " in str(failed.value)  # and what is there instead


class RecordingText:
    """A stand-in text encoder: fixed-size random states, and the prompts it was given."""

    def __init__(self, hidden: int):
        self.hidden, self.prompts = hidden, []

    def _states(self, prompts):
        import torch

        self.prompts.extend(prompts)
        generator = torch.Generator().manual_seed(len(self.prompts))
        return torch.randn(len(prompts), 6, self.hidden, generator=generator), torch.ones(len(prompts), 6, dtype=torch.long)

    encode_text = embed_lyrics = _states


def test_parts_are_injected_without_checkpoints_on_disk():
    import torch
    from diffusers import AutoencoderOobleck

    from pipeline.dit.config import DiTConfig
    from pipeline.dit.model import AceStepDiT
    from pipeline.service import AceStepPipeline, Components
    from pipeline.tiny import TEXT_HIDDEN, random_dit_state, tiny_dit_config
    from pipeline.vae import TINY_CONFIG, Vae

    vae = Vae(AutoencoderOobleck(**TINY_CONFIG).eval())
    dit = AceStepDiT(DiTConfig.from_dict(tiny_dit_config(vae.latent_dim, TEXT_HIDDEN))).eval()
    dit.load_state_dict(random_dit_state(dit, seed=1))
    text = RecordingText(TEXT_HIDDEN)
    pipe = AceStepPipeline(Components(dit_name="in-memory", dit=dit, silence=torch.zeros(1, 10, vae.latent_dim), vae=vae,
                                      text=text, device=torch.device("cpu"), dtype=torch.float32))
    out = pipe.run(request(caption="injected", audio_duration=2.0, batch_size=1), lambda stage, fraction, **facts: None)
    assert out.audios[0].shape == (2, 2 * SAMPLE_RATE) and out.info["dit_model"] == "in-memory"
    assert "injected" in text.prompts[0] and "[inst]" in text.prompts[1]  # caption prompt, then lyric prompt
