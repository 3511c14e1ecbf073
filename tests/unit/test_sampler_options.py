"""Upstream main's sampler and post-processing options in the request: defaults, the reference's
comma text, a refusal naming the field for each bad value, and the checks that need the model
(dit_kind, resolve_model, check_model_options)."""

import pytest
from pydantic import ValidationError

from pipeline.contract import (
    API_TASK_TYPES,
    BASE_MODELS,
    SOURCE_TASK_TYPES,
    GenerationRequest,
    PipelineOptions,
    RequestOptionError,
    check_model_options,
    dit_kind,
    request_document,
    request_from_row,
    resolve_model,
)

EXAMPLE = "0.97,0.76,0.615,0.5,0.395,0.28,0.18,0.085,0"
SRC = {"src_audio_path": "jobs/x/input-src.wav"}


def test_defaults_are_upstreams():
    r = GenerationRequest()
    assert (r.model, r.shift, r.timesteps, r.infer_method, r.sampler_mode) == (None, 3.0, None, "ode", "euler")
    assert (r.velocity_norm_threshold, r.velocity_ema_factor) == (0.0, 0.0)
    assert (r.dcw_enabled, r.dcw_mode, r.dcw_scaler, r.dcw_high_scaler, r.dcw_wavelet) == (True, "double", 0.05, 0.02, "haar")
    assert (r.use_adg, r.cfg_interval_start, r.cfg_interval_end) == (False, 0.0, 1.0)
    assert (r.cover_noise_strength, r.chunk_mask_mode) == (0.0, "auto")
    assert (r.repaint_mode, r.repaint_strength, r.repaint_latent_crossfade_frames, r.repaint_wav_crossfade_sec) == (
        "balanced", 0.5, 10, 0.0)
    assert (r.retake_seed, r.retake_variance) == (None, 0.0)
    assert (r.latent_shift, r.latent_rescale, r.enable_normalization, r.normalization_db) == (0.0, 1.0, True, -1.0)
    assert (r.fade_in_duration, r.fade_out_duration) == (0.0, 0.0)
    assert PipelineOptions().dit_models == () and PipelineOptions.variables["dit_models"] == "ACESTEP_DIT_MODELS"


def test_every_new_field_is_described():
    for name in ("model", "shift", "timesteps", "dcw_wavelet", "chunk_mask_mode", "repaint_latent_crossfade_frames",
                 "repaint_wav_crossfade_sec", "retake_seed", "normalization_db", "fade_out_duration"):
        assert GenerationRequest.model_fields[name].description, name
    chunk = GenerationRequest.model_fields["chunk_mask_mode"].description
    assert "2.0" in chunk and "1290" in chunk and "explicit" in chunk
    assert "unused" in GenerationRequest.model_fields["repaint_wav_crossfade_sec"].description


def test_timesteps_as_comma_text_or_list():
    expected = [0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0.0]
    assert GenerationRequest(timesteps=EXAMPLE).timesteps == expected
    assert GenerationRequest(timesteps=f"[{EXAMPLE}]").timesteps == expected
    assert GenerationRequest(timesteps=expected).timesteps == expected
    assert GenerationRequest(timesteps="").timesteps is None
    assert GenerationRequest(timesteps=[0.5]).timesteps == [0.5]


def test_retake_seed_reads_like_seed():
    assert GenerationRequest(retake_seed="42,43").retake_seed == [42, 43]
    assert GenerationRequest(retake_seed=7).retake_seed == 7
    assert GenerationRequest(retake_seed=-1, retake_variance=0.3).retake_seed == -1
    assert GenerationRequest(retake_seed="").retake_seed is None


def test_cover_nofsq_is_a_source_task():
    assert "cover-nofsq" in API_TASK_TYPES and "cover-nofsq" in SOURCE_TASK_TYPES
    assert GenerationRequest(task_type="cover-nofsq", **SRC).task_type == "cover-nofsq"
    with pytest.raises(ValidationError, match="needs source audio"):
        GenerationRequest(task_type="cover-nofsq")


def test_form_text_is_coerced():
    r = GenerationRequest.model_validate({"shift": "2.5", "use_adg": "false", "dcw_enabled": "false",
                                          "repaint_latent_crossfade_frames": "12", "normalization_db": "-3"})
    assert (r.shift, r.use_adg, r.dcw_enabled, r.repaint_latent_crossfade_frames, r.normalization_db) == (
        2.5, False, False, 12, -3.0)


@pytest.mark.parametrize("body,field,words", [
    ({"model": "turbo"}, "model", "acestep-v15-"),
    ({"model": "acestep-v15-turbo/../x"}, "model", "acestep-v15-"),
    ({"shift": 0.5}, "shift", "greater than or equal to 1"),
    ({"shift": 5.5}, "shift", "less than or equal to 5"),
    ({"timesteps": "0.9,1.5,0"}, "timesteps", "[0, 1]"),
    ({"timesteps": [1.5]}, "timesteps", "[0, 1]"),
    ({"timesteps": [-0.1]}, "timesteps", "[0, 1]"),
    ({"timesteps": "0.5,0.7,0"}, "timesteps", "strictly decreasing"),
    ({"timesteps": "0.5,0.5,0"}, "timesteps", "strictly decreasing"),
    ({"timesteps": "0"}, "timesteps", "above 0"),
    ({"timesteps": []}, "timesteps", "at least one"),
    ({"timesteps": "0.9,fast"}, "timesteps", "numbers"),
    ({"timesteps": [1 - i / 300 for i in range(202)]}, "timesteps", "at most 201"),
    ({"infer_method": "dpm"}, "infer_method", "'ode' or 'sde'"),
    ({"sampler_mode": "rk4"}, "sampler_mode", "'euler' or 'heun'"),
    ({"velocity_norm_threshold": -1}, "velocity_norm_threshold", "greater than or equal to 0"),
    ({"velocity_ema_factor": 1.0}, "velocity_ema_factor", "less than 1"),
    ({"velocity_ema_factor": -0.1}, "velocity_ema_factor", "greater than or equal to 0"),
    ({"dcw_mode": "both"}, "dcw_mode", "double"),
    ({"dcw_scaler": 1.5}, "dcw_scaler", "less than or equal to 1"),
    ({"dcw_high_scaler": -0.1}, "dcw_high_scaler", "greater than or equal to 0"),
    ({"dcw_wavelet": "db4"}, "dcw_wavelet", "only the haar wavelet is implemented"),
    ({"cfg_interval_start": -0.1}, "cfg_interval_start", "greater than or equal to 0"),
    ({"cfg_interval_end": 1.1}, "cfg_interval_end", "less than or equal to 1"),
    ({"cfg_interval_start": 0.8, "cfg_interval_end": 0.3}, "cfg_interval_end", "at least cfg_interval_start"),
    ({"cover_noise_strength": 2}, "cover_noise_strength", "less than or equal to 1"),
    ({"chunk_mask_mode": "fixed"}, "chunk_mask_mode", "auto_fixed"),
    ({"repaint_mode": "wild"}, "repaint_mode", "balanced"),
    ({"repaint_strength": 1.5}, "repaint_strength", "less than or equal to 1"),
    ({"repaint_latent_crossfade_frames": -1}, "repaint_latent_crossfade_frames", "greater than or equal to 0"),
    ({"repaint_wav_crossfade_sec": -1}, "repaint_wav_crossfade_sec", "greater than or equal to 0"),
    ({"retake_seed": "1,x"}, "retake_seed", "integer"),
    ({"retake_seed": -2}, "retake_seed", "-1 (random)"),
    ({"retake_variance": 1.5}, "retake_variance", "less than or equal to 1"),
    ({"latent_rescale": 0}, "latent_rescale", "greater than 0"),
    ({"latent_shift": "inf"}, "latent_shift", "finite"),
    ({"normalization_db": 1}, "normalization_db", "less than or equal to 0"),
    ({"normalization_db": -61}, "normalization_db", "greater than or equal to -60"),
    ({"fade_in_duration": -1}, "fade_in_duration", "greater than or equal to 0"),
    ({"fade_out_duration": 61}, "fade_out_duration", "less than or equal to 60"),
    ({"task_type": "cover-fsq", **SRC}, "task_type", "cover-nofsq"),
])
def test_each_bad_value_is_refused_naming_the_field(body, field, words):
    with pytest.raises(ValidationError) as refused:
        GenerationRequest.model_validate(body)
    errors = refused.value.errors()
    assert [e["loc"][0] for e in errors] == [field], errors
    assert words in errors[0]["msg"], errors[0]["msg"]


def test_stored_rows_keep_the_new_options_and_old_rows_take_the_defaults():
    request = GenerationRequest(model="acestep-v15-base", timesteps=EXAMPLE, sampler_mode="heun", retake_seed=[1, 2],
                                retake_variance=0.3, dcw_enabled=False, fade_out_duration=2.5)
    assert request_from_row(request_document(request, inputs={})) == request
    assert request_from_row({"caption": "an old row"}).shift == 3.0


@pytest.mark.parametrize("name,kind", [
    ("acestep-v15-turbo", "turbo"), ("acestep-v15-turbo-shift1", "turbo"), ("acestep-v15-xl-turbo", "turbo"),
    ("acestep-v15-turbo-continuous", "turbo"), ("acestep-v15-base", "base"), ("acestep-v15-xl-base", "base"),
    ("acestep-v15-sft", "sft"), ("acestep-v15-xl-sft", "sft"),
])
def test_dit_kind_from_the_name(name, kind):
    assert dit_kind(name) == kind


def test_dit_kind_of_an_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="turbo, base or SFT"):
        dit_kind("acestep-v15-custom")


def test_resolve_model():
    lego = GenerationRequest(task_type="lego", track_name="vocals", **SRC)
    assert BASE_MODELS == ("acestep-v15-base", "acestep-v15-xl-base")
    assert resolve_model(GenerationRequest(), "acestep-v15-turbo") == "acestep-v15-turbo"
    assert resolve_model(GenerationRequest(model="acestep-v15-sft"), "acestep-v15-turbo") == "acestep-v15-sft"
    assert resolve_model(lego, "acestep-v15-turbo") == "acestep-v15-base"
    assert resolve_model(lego, "acestep-v15-sft") == "acestep-v15-base"
    assert resolve_model(lego, "acestep-v15-xl-base") == "acestep-v15-xl-base"
    assert resolve_model(lego.model_copy(update={"model": "acestep-v15-turbo"}), "acestep-v15-base") == "acestep-v15-turbo"


def refused(request: GenerationRequest, model: str) -> RequestOptionError:
    with pytest.raises(RequestOptionError) as caught:
        check_model_options(request, model)
    return caught.value


@pytest.mark.parametrize("task", ["lego", "extract", "complete"])
@pytest.mark.parametrize("model", ["acestep-v15-turbo", "acestep-v15-sft", "acestep-v15-xl-turbo"])
def test_base_only_tasks_on_another_model(task, model):
    error = refused(GenerationRequest(task_type=task, **SRC), model)
    assert error.field == "task_type"
    assert "acestep-v15-base" in error.message and "acestep-v15-xl-base" in error.message and model in error.message
    check_model_options(GenerationRequest(task_type=task, **SRC), "acestep-v15-base")
    check_model_options(GenerationRequest(task_type=task, **SRC), "acestep-v15-xl-base")


@pytest.mark.parametrize("options,field", [
    ({"use_adg": True}, "use_adg"), ({"cfg_interval_start": 0.2}, "cfg_interval_start"),
    ({"cfg_interval_end": 0.9}, "cfg_interval_end"),
])
def test_guidance_options_on_turbo(options, field):
    error = refused(GenerationRequest(**options), "acestep-v15-turbo")
    assert error.field == field and "only base and SFT models use guidance" in error.message
    for model in ("acestep-v15-base", "acestep-v15-sft", "acestep-v15-xl-sft"):
        check_model_options(GenerationRequest(**options), model)


def test_timesteps_that_the_model_cannot_run():
    many = [round(1 - i / 21, 6) for i in range(22)]  # 21 non-zero values and a final 0
    error = refused(GenerationRequest(timesteps=many), "acestep-v15-turbo")
    assert error.field == "timesteps" and "20" in error.message and "snaps" in error.message
    check_model_options(GenerationRequest(timesteps=many[1:]), "acestep-v15-turbo")  # 20 non-zero values
    check_model_options(GenerationRequest(timesteps=many), "acestep-v15-base")
    check_model_options(GenerationRequest(timesteps=[0.5]), "acestep-v15-turbo")  # one step is fine on turbo
    for model in ("acestep-v15-base", "acestep-v15-sft"):
        error = refused(GenerationRequest(timesteps=[0.5]), model)
        assert error.field == "timesteps" and "at least 2 values" in error.message
    check_model_options(GenerationRequest(timesteps=EXAMPLE), "acestep-v15-base")


def test_an_unknown_kind_of_model_is_left_to_the_worker():
    check_model_options(GenerationRequest(use_adg=True, task_type="lego", **SRC), "acestep-v15-custom")


def test_the_defaults_pass_on_every_model():
    for model in ("acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft"):
        check_model_options(GenerationRequest(), model)
