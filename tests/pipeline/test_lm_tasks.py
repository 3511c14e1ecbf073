"""The LM's own tasks (format, create sample, understand) through the pipeline on the tiny random
checkpoints, and generation with sample_mode / use_format: whatever the random LM writes, the
answers have the reference API's shape, user values are forced in and the job fails clearly when it
cannot run."""

import pytest

from pipeline.audio_io import SAMPLE_RATE
from pipeline.contract import LANGUAGES, GenerationRequest, PipelineOptions
from pipeline.interface import PipelineError
from pipeline.lm import tasks as lm_tasks
from pipeline.lm.backend import TextRequest
from pipeline.service import load_pipeline
from tests.fakes import pipelines as fakes

ANSWER_KEYS = {"caption", "lyrics", "bpm", "duration", "key_scale", "time_signature", "vocal_language", "status_message",
               "lm_model", "lm_backend"}
MAX_DURATION = 12  # the LM's longest song on this pipeline: what the random LM plans stays short


@pytest.fixture(scope="module")
def pipe_with_lm(tiny_checkpoints, tmp_path_factory):
    import shutil

    from pipeline.tiny import TINY_LM
    from pipeline.tiny_text import build_tiny_lm

    root = tmp_path_factory.mktemp("tasks-with-lm")
    shutil.copytree(tiny_checkpoints, root, dirs_exist_ok=True)
    build_tiny_lm(root / TINY_LM)
    return load_pipeline(root, PipelineOptions(lm_max_duration=MAX_DURATION))


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints)


@pytest.fixture(autouse=True)
def short_outputs(monkeypatch):
    from pipeline.lm import decoding

    monkeypatch.setattr(decoding, "MAX_CAPTION_TOKENS", 16)  # random weights rarely end a line on their own
    monkeypatch.setattr(lm_tasks, "TEXT_MAX_NEW_TOKENS", 120)  # the block (~80 tokens), then some lyrics


def task(pipe, name, **params):
    stages = []
    answer = pipe.run_lm_task(name, params, lambda stage, fraction: stages.append(stage))
    assert stages and set(stages) == {"lm"}
    return answer


def assert_answer_shape(answer, extra=frozenset()):
    assert set(answer) == ANSWER_KEYS | set(extra)
    assert isinstance(answer["caption"], str) and answer["caption"]
    assert isinstance(answer["lyrics"], str)
    assert answer["bpm"] is None or 30 <= answer["bpm"] <= 300
    assert answer["duration"] is None or isinstance(answer["duration"], float)
    assert answer["lm_model"] == "acestep-5Hz-lm-0.6B" and answer["lm_backend"] == "pt"


def test_format_forces_the_users_metas_and_language(pipe_with_lm):
    answer = task(pipe_with_lm, "format", caption="calm piano", lyrics="[Verse]\nla la", bpm=96, audio_duration=11.7,
                  key_scale="G major", time_signature="3", vocal_language="de", lm_backend="pt", seed=3)
    assert_answer_shape(answer)
    assert (answer["bpm"], answer["duration"], answer["key_scale"], answer["time_signature"]) == (96, 11.0, "G major", "3")
    assert answer["vocal_language"] == "de"  # injected although skip_language is set
    assert answer["status_message"].startswith("✅ Format completed successfully\nGenerated fields: bpm, caption, duration")


def test_format_fills_what_is_missing_with_valid_values(pipe_with_lm):
    answer = task(pipe_with_lm, "format", prompt="", lyrics="", lm_backend="pt", lm_temperature=1.2, seed=4)
    assert_answer_shape(answer)
    assert 10.0 <= answer["duration"] <= MAX_DURATION and answer["key_scale"].split(" ")[1] in ("major", "minor")
    assert answer["time_signature"] in ("2", "3", "4", "6")


def test_create_sample_echoes_instrumental_and_forces_the_language(pipe_with_lm):
    answer = task(pipe_with_lm, "create_sample", query="a soft love song", instrumental=True, vocal_language="bn",
                  lm_backend="pt", seed=5)
    assert_answer_shape(answer, {"instrumental"})
    assert answer["instrumental"] is True and answer["vocal_language"] == "bn"
    assert answer["lyrics"]  # the LM's lyrics, or [Instrumental] when it wrote none
    assert 10.0 <= answer["duration"] <= MAX_DURATION
    assert answer["status_message"].startswith("✅ Sample created successfully\nGenerated fields: {")


def test_create_sample_sniffs_language_and_instrumental_from_the_query(pipe_with_lm):
    answer = task(pipe_with_lm, "create_sample", description="Korean pop, instrumental", lm_backend="pt", seed=6)
    assert answer["instrumental"] is True and answer["vocal_language"] == "ko"


def test_understand_reads_audio_codes(pipe_with_lm):
    codes = "".join(f"<|audio_code_{n}|>" for n in (12, 40000, 7, 63999))
    answer = task(pipe_with_lm, "understand", audio_code_string=codes, lm_backend="pt", seed=7)
    assert_answer_shape(answer)
    assert answer["status_message"].startswith("✅ Understanding completed successfully")
    assert answer["vocal_language"] in LANGUAGES


def test_the_same_seed_gives_the_same_answer(pipe_with_lm):
    first = task(pipe_with_lm, "understand", audio_codes="", lm_backend="pt", seed=11)
    again = task(pipe_with_lm, "understand", audio_codes="", lm_backend="pt", seed=11)
    assert first == again


def test_bad_tasks_and_params_fail_clearly(pipe_with_lm, pipe):
    with pytest.raises(PipelineError, match="unknown LM task 'remix'") as error:
        pipe_with_lm.run_lm_task("remix", {}, lambda *_: None)
    assert not error.value.retryable
    with pytest.raises(PipelineError, match="unknown parameter.*format: captoin"):
        pipe_with_lm.run_lm_task("format", {"captoin": "x"}, lambda *_: None)
    with pytest.raises(PipelineError, match="bpm must be a number, got 'fast'"):
        pipe_with_lm.run_lm_task("format", {"bpm": "fast"}, lambda *_: None)
    with pytest.raises(PipelineError, match="instrumental must be true or false"):
        pipe_with_lm.run_lm_task("create_sample", {"instrumental": "maybe"}, lambda *_: None)
    with pytest.raises(PipelineError, match="5 Hz LM 'acestep-5Hz-lm-4B' is not loaded"):
        pipe_with_lm.run_lm_task("understand", {"lm_model_path": "acestep-5Hz-lm-4B"}, lambda *_: None)
    with pytest.raises(PipelineError, match="the LM task format needs a 5 Hz LM, and this worker has none loaded"):
        pipe.run_lm_task("format", {"caption": "x"}, lambda *_: None)


def test_the_fake_pipelines_answer_in_the_same_shape(pipe_with_lm):
    fake = fakes.ok()
    fake.stage_seconds = 0.0
    for name, params in [("format", {"caption": "x", "bpm": 90}), ("create_sample", {"query": "y", "instrumental": True}),
                         ("understand", {"audio_code_string": "<|audio_code_1|>"})]:
        ours = fake.run_lm_task(name, params, lambda *_: None)
        real = task(pipe_with_lm, name, lm_backend="pt", seed=1, **params)
        assert set(ours) == set(real) and {type(ours[k]) for k in ("caption", "lyrics", "status_message")} == {str}
    assert fake.run_lm_task("format", {"caption": "x", "bpm": 90}, lambda *_: None)["bpm"] == 90
    with pytest.raises(PipelineError):
        fake.run_lm_task("remix", {}, lambda *_: None)


# ---- generation with sample_mode / use_format ---------------------------------------------------


def request(**overrides):
    base = dict(caption="a calm piano piece", lyrics="[inst]", vocal_language="en", batch_size=1, audio_duration=3.0,
                use_random_seed=False, seed=7, inference_steps=2, guidance_scale=7.0, task_type="text2music",
                audio_format="wav", audio_cover_strength=1.0, thinking=False, lm_backend="pt")
    return GenerationRequest.model_construct(**(base | overrides))


def test_sample_mode_generation_uses_what_the_lm_wrote(pipe_with_lm):
    stages = []
    out = pipe_with_lm.run(request(sample_mode=True, sample_query="a quiet ballad", audio_duration=None, caption="",
                                   lyrics=""), lambda stage, fraction, **facts: stages.append(stage))
    metas = out.info["metas"]
    assert metas["lm_tasks"] == ["create_sample"] and metas["caption"] and metas["lyrics"]
    assert 30 <= out.info["bpm"] <= 300 and out.info["keyscale"] and out.info["timesignature"]
    # the song is as long as the LM said (10 s .. this pipeline's LM maximum)
    seconds = out.audios[0].shape[1] / SAMPLE_RATE
    assert 10 <= seconds <= MAX_DURATION and out.info["duration"] == seconds
    assert out.info["lm_model"] == "acestep-5Hz-lm-0.6B" and "lm" in stages


def test_use_format_keeps_the_users_metas(pipe_with_lm):
    out = pipe_with_lm.run(request(use_format=True, bpm=88, key_scale="D minor", time_signature="4", audio_duration=3.0),
                           lambda *_, **facts: None)
    metas = out.info["metas"]
    assert metas["lm_tasks"] == ["format"]
    assert metas["caption"] != "a calm piano piece"  # the LM's caption replaced the request's
    assert (out.info["bpm"], out.info["keyscale"], out.info["timesignature"]) == (88, "D minor", "4")
    assert out.audios[0].shape == (2, 3 * SAMPLE_RATE)


def test_sample_mode_keeps_a_duration_and_bpm_the_user_gave(pipe_with_lm):
    out = pipe_with_lm.run(request(sample_query="a quiet ballad", audio_duration=4.0, bpm=70, caption="", lyrics=""),
                           lambda *_, **facts: None)
    assert out.info["metas"]["lm_tasks"] == ["create_sample"]
    assert out.audios[0].shape == (2, 4 * SAMPLE_RATE) and out.info["bpm"] == 70


def test_sample_mode_and_format_without_an_lm_fail_the_job(pipe):
    with pytest.raises(PipelineError, match="sample_mode/sample_query needs the 5 Hz LM"):
        pipe.run(request(sample_query="a quiet ballad"), lambda *_: None)
    with pytest.raises(PipelineError, match="use_format needs the 5 Hz LM"):
        pipe.run(request(use_format=True), lambda *_: None)


@pytest.mark.parametrize("task_type", ["lego", "extract", "complete"])
def test_base_model_tasks_fail_on_turbo_with_a_clear_message(pipe, task_type, tmp_path):
    with pytest.raises(PipelineError) as error:
        pipe.run(request(task_type=task_type, src_audio_path=str(tmp_path / "src.wav")), lambda *_: None)
    assert str(error.value) == (f"task_type {task_type} needs a base model (acestep-v15-base, acestep-v15-xl-base); "
                                f"the job runs {pipe.dit_name}")
    assert not error.value.retryable


# ---- the tasks over a recording stub ------------------------------------------------------------


class StubLM:
    name, backend = "stub", "stub"

    def __init__(self, output: str):
        self.output, self.requests = output, []

    def generate_text(self, request: TextRequest) -> str:
        self.requests.append(request)
        return self.output


def test_prepare_runs_sample_then_format_and_format_overrides():
    lm = StubLM("<think>\nbpm: 99\ncaption: LM caption\nduration: 42\nkeyscale: E minor\ntimesignature: 3\n</think>\n"
                "# Lyric\n[Verse]\nhey<|im_end|>")
    fields = lm_tasks.lm_input_fields(request(sample_query="french chanson", use_format=True, vocal_language="unknown",
                                              lm_top_p=1.0, lm_top_k=None))
    prepared = lm_tasks.prepare_llm_inputs(fields, lm, seed=3)
    sample, formatted = lm.requests
    assert sample.user_metadata == {"language": "fr"} and not sample.skip_language  # from the query
    assert formatted.user_metadata == {"bpm": 99, "duration": 42, "keyscale": "E minor", "timesignature": "3"}
    assert sample.sampling.top_p == formatted.sampling.top_p == 0.9  # the reference's API default when >= 1
    assert sample.seed == 3 and sample.generation_phase == "understand" and not sample.stop_at_reasoning
    assert (prepared.caption, prepared.lyrics, prepared.bpm, prepared.audio_duration) == ("LM caption", "[Verse]\nhey", 99, 42.0)
    assert prepared.format_has_duration and [name for name, _ in prepared.lm_results] == ["create_sample", "format"]


def test_prepare_without_lm_turns_cot_off_and_needs_no_call():
    prepared = lm_tasks.prepare_llm_inputs(lm_tasks.lm_input_fields(request(thinking=True)), None)
    assert not prepared.use_cot_caption and not prepared.use_cot_language and prepared.caption == "a calm piano piece"
    assert not lm_tasks.uses_lm_inputs(lm_tasks.lm_input_fields(request(sample_query="   ")))


def test_a_task_request_travels_to_the_vllm_engine_and_back():
    from pipeline.lm.vllm_backend import cfg_scale_of, request_from_args, request_to_args

    sent = lm_tasks.format_request("x", "y", {"bpm": "100", "language": "es"}, seed=9, top_k=40)
    back = request_from_args(request_to_args(sent, "pair", "cond")["acestep_lm"])
    assert back == TextRequest(**{**sent.__dict__, "prompt": ""}) and cfg_scale_of(back) == 1.0
    assert back.user_metadata == {"bpm": 100, "language": "es"} and back.skip_language
