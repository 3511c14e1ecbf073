"""`run_batch` in the real pipeline (issue 18): jobs that agree on their settings share each DiT
decoder call (songs of other lengths padded, each row attending only to its own frames and its own
condition) and jobs of one length one VAE decode, so the batch gives what each job alone gives; the
LM writes the codes of all of them in one pass; jobs of other settings form their own batches in the
same call, and a job whose input fails fails alone."""

import numpy as np
import pytest

from pipeline.contract import SAMPLE_RATE, PipelineOptions
from pipeline.interface import PipelineError
from pipeline.service import load_pipeline
from pipeline.tiny import TINY_DITS
from tests.pipeline.test_service import request, tone_file


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints, PipelineOptions(dit_models=TINY_DITS[1:]))


def decoder_batches(pipe, monkeypatch) -> list[int]:
    """The batch size of every DiT decoder call from now on."""
    sizes: list[int] = []
    forward = type(pipe.dit.decoder).forward

    def counted(module, hidden_states, *args, **kwargs):
        sizes.append(hidden_states.shape[0])
        return forward(module, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(pipe.dit.decoder), "forward", counted)
    return sizes


def test_a_batch_gives_what_each_job_gives_alone(pipe, tmp_path, monkeypatch, capsys):
    jobs = [
        request(caption="calm piano", batch_size=2, seed=1),
        request(caption="an energetic rock song with loud drums and a long caption", lyrics="[verse]\nla la la la",
                seed=5),
        request(caption="calm piano", audio_duration=4.2, seed=9),  # another length: padded into the same calls
        request(caption="sde", infer_method="sde", seed=3),  # other settings: its own DiT batch
        request(caption="base", model="acestep-v15-base", inference_steps=3, seed=4),
        request(task_type="cover", src_audio_path=str(tmp_path / "missing.wav"), seed=2),  # fails alone
        request(caption="retake", retake_seed=8, retake_variance=0.4, seed=6, batch_size=2),
    ]
    alone = []
    for job in jobs:
        try:
            alone.append(pipe.run(job, lambda *_, **__: None))
        except PipelineError as exc:
            alone.append(exc)
    sizes = decoder_batches(pipe, monkeypatch)
    together = pipe.run_batch(jobs, lambda *_, **__: None)
    assert isinstance(alone[5], PipelineError) and isinstance(together[5], PipelineError)
    assert str(together[5]) == str(alone[5])
    for one, many in zip(alone, together, strict=True):
        if not isinstance(one, PipelineError):
            assert len(one.audios) == len(many.audios) and one.info["seed_value"] == many.info["seed_value"]
    worst = worst_difference(alone, together)
    with capsys.disabled():
        print(f"\nbatched vs one by one: max |difference| {worst:.2e} over {sum(len(r.audios) for r in alone if not isinstance(r, PipelineError))} songs")
    assert worst < 1e-4
    # jobs 0, 1, 2 and 6 (6 songs, captions of three lengths, two song lengths) share each decoder call
    assert 6 in sizes and max(sizes) == 6
    assert alone[2].audios[0].shape == (2, round(4.2 * SAMPLE_RATE))


def worst_difference(alone: list, together: list) -> float:
    """The largest |difference| between the songs each job made alone and in the batch (same shapes);
    jobs that failed alone are skipped."""
    worst = 0.0
    for one, many in zip(alone, together, strict=True):
        if isinstance(one, PipelineError):
            continue
        for a, b in zip(one.audios, many.audios, strict=True):
            assert a.shape == b.shape
            worst = max(worst, float(np.abs(a - b).max()))
    return worst


def test_a_job_alone_fails_as_before(pipe, tmp_path):
    with pytest.raises(PipelineError, match="source audio"):
        pipe.run(request(task_type="cover", src_audio_path=str(tmp_path / "missing.wav")), lambda *_, **__: None)


def test_jobs_of_one_length_and_different_prompts_batch(pipe, tmp_path):
    src = tone_file(tmp_path / "src.wav", 3.0)
    jobs = [request(task_type="repaint", src_audio_path=src, repainting_start=1.0, repainting_end=2.0, seed=s,
                    caption=c) for s, c in ((1, "a"), (2, "a much longer caption for the second repaint job"))]
    alone = [pipe.run(job, lambda *_, **__: None) for job in jobs]
    together = pipe.run_batch(jobs, lambda *_, **__: None)
    for one, many in zip(alone, together, strict=True):
        assert np.abs(one.audios[0] - many.audios[0]).max() < 1e-4


def test_jobs_with_a_lora_run_with_it_and_batch_only_with_the_same_adapters(pipe, tmp_path):
    """A job's adapters (local `path` set by the worker) act on its DiT for that job only; jobs that
    name other adapters (or none) never share its pass."""
    from tests.pipeline.test_lora import make_adapter

    folder = make_adapter(pipe.dit, tmp_path / "style", seed=3)
    styled = request(seed=1, lora=[{"name": "style", "scale": 1.0, "path": str(folder)}])
    plain = request(seed=1)
    alone = [pipe.run(job, lambda *_, **__: None) for job in (styled, plain)]
    assert np.abs(alone[0].audios[0] - alone[1].audios[0]).max() > 1e-3  # the adapter changed the song
    together = pipe.run_batch([styled, plain], lambda *_, **__: None)
    for one, many in zip(alone, together, strict=True):
        assert np.abs(one.audios[0] - many.audios[0]).max() < 1e-4
    missing = pipe.run_batch([request(lora=[{"name": "gone", "path": str(tmp_path / "gone")}]), plain],
                             lambda *_, **__: None)
    assert isinstance(missing[0], PipelineError) and "lora" in str(missing[0])
    assert np.abs(missing[1].audios[0] - alone[1].audios[0]).max() < 1e-4


@pytest.fixture(scope="module")
def lm_pipe(tiny_checkpoints, tmp_path_factory):
    """The tiny checkpoints with the tiny 5 Hz LM (pt backend)."""
    import shutil

    from pipeline.tiny import TINY_LM
    from pipeline.tiny_text import build_tiny_lm

    root = tmp_path_factory.mktemp("with-lm")
    shutil.copytree(tiny_checkpoints, root, dirs_exist_ok=True)
    build_tiny_lm(root / TINY_LM)
    return load_pipeline(root, PipelineOptions(lm_max_duration=30, vllm=False))


def test_the_lm_writes_the_codes_of_several_jobs_in_one_pass_as_each_alone(lm_pipe, capsys):
    """Thinking jobs of different captions, seeds and batch sizes: their audio codes come from one LM
    pass (all rows together) and each job gets the codes and the audio it gets alone."""
    jobs = [
        request(caption="calm piano", thinking=True, seed=11),
        request(caption="a loud and fast punk rock song with screaming vocals", thinking=True, seed=12, batch_size=2),
        request(caption="lo-fi beat", thinking=True, seed=13, audio_duration=4.0),
        request(caption="no lm codes here", seed=14),  # thinking off: no codes to write
    ]
    alone = [lm_pipe.run(job, lambda *_, **__: None) for job in jobs]
    broken = request(caption="an LM nobody serves", thinking=True, seed=15, lm_model_path="acestep-5Hz-lm-9B")
    with pytest.raises(PipelineError) as alone_error:
        lm_pipe.run(broken, lambda *_, **__: None)
    *together, failed = lm_pipe.run_batch([*jobs, broken], lambda *_, **__: None)
    assert isinstance(failed, PipelineError) and str(failed) == str(alone_error.value)  # it fails alone
    assert lm_pipe.lm_code_passes == [4], lm_pipe.lm_code_passes  # one pass: 1 + 2 + 1 rows
    worst = 0.0
    for one, many in zip(alone, together, strict=True):
        assert not isinstance(many, PipelineError), many
        assert one.info == many.info  # the LM's metas too; the codes condition the audio compared below
        for a, b in zip(one.audios, many.audios, strict=True):
            worst = max(worst, float(np.abs(a - b).max()))
    with capsys.disabled():
        print(f"\nLM batched across jobs vs one by one: max |difference| {worst:.2e}")
    assert worst < 1e-4


def test_songs_of_several_lengths_share_each_decoder_call_as_each_alone(pipe, monkeypatch, capsys):
    """Three lengths (one odd number of frames), base model with guidance (the doubled batch), DCW,
    SDE re-noising and a repaint-free retake: the decoder runs once per step for all of them, and
    every song is what it is alone."""
    settings = dict(model="acestep-v15-base", inference_steps=4, guidance_scale=5.0, infer_method="sde",
                    dcw_enabled=True)
    jobs = [request(caption="short", audio_duration=2.0, seed=21, **settings),
            request(caption="a middling one with a longer caption", audio_duration=3.3, seed=22, batch_size=2, **settings),
            request(caption="long", audio_duration=5.0, seed=23, retake_seed=2, retake_variance=0.3, **settings)]
    alone = [pipe.run(job, lambda *_, **__: None) for job in jobs]
    sizes = decoder_batches(pipe, monkeypatch)
    together = pipe.run_batch(jobs, lambda *_, **__: None)
    assert set(sizes) == {8}, sizes  # 4 songs x 2 (conditional and unconditional rows) in every call
    assert pipe.dit_passes and set(pipe.dit_passes) == {8}
    worst = worst_difference(alone, together)
    with capsys.disabled():
        print(f"\nsongs of 2.0, 3.3 and 5.0 s in one decoder call vs alone: max |difference| {worst:.2e}")
    assert worst < 1e-4


def test_a_cancel_during_a_batch_of_several_lengths_stops_every_group(pipe, monkeypatch):
    from pipeline.interface import Canceled

    jobs = [request(caption="a", audio_duration=2.0, seed=1), request(caption="b", audio_duration=3.5, seed=2)]
    sizes = decoder_batches(pipe, monkeypatch)

    def progress(stage, fraction, **facts):
        if stage == "dit" and len(sizes) >= 3:  # the cancel the worker hands in through the progress call
            raise Canceled()

    with pytest.raises(Canceled):
        pipe.run_batch(jobs, progress)
    assert 3 <= len(sizes) < 8  # stopped within a step of the cancel, not after the 8 steps
