"""The generate request: the seed API's defaults, and a clear error for each rule."""

import pytest
from pydantic import ValidationError

from pipeline.contract import DEFAULT_INSTRUCTION, DURATION_MAX, MAX_CODE_STRING_CHARS, GenerationRequest

SPEC_DEFAULTS = {
    "caption": "", "lyrics": "", "thinking": False, "vocal_language": "en", "audio_format": "mp3",
    "bpm": None, "key_scale": "", "time_signature": "", "audio_duration": None, "audio_code_string": "",
    "inference_steps": 8, "guidance_scale": 7.0, "use_random_seed": True, "seed": -1, "batch_size": None,
    "lm_model_path": None, "lm_backend": "vllm", "lm_temperature": 0.85, "lm_cfg_scale": 2.0,
    "lm_negative_prompt": "NO USER INPUT", "lm_top_k": None, "lm_top_p": 0.9, "lm_repetition_penalty": 1.0,
    "reference_audio_path": None, "src_audio_path": None, "task_type": "text2music",
    "instruction": DEFAULT_INSTRUCTION, "repainting_start": 0.0, "repainting_end": None,
    "audio_cover_strength": 1.0, "webhook_url": None,
}
# Fields beyond the seed spec, from the reference API (issue 13), each at the reference's default.
REFERENCE_DEFAULTS = {
    "use_cot_caption": True, "use_cot_language": True, "use_format": False, "sample_mode": False,
    "sample_query": "", "global_caption": "", "track_name": None, "track_classes": None,
}

# Upstream main's sampler and post-processing options, each at upstream's default (no model: the deployment's).
SAMPLER_DEFAULTS = {
    "model": None, "shift": 3.0, "timesteps": None, "infer_method": "ode", "sampler_mode": "euler",
    "velocity_norm_threshold": 0.0, "velocity_ema_factor": 0.0, "dcw_enabled": True, "dcw_mode": "double",
    "dcw_scaler": 0.05, "dcw_high_scaler": 0.02, "dcw_wavelet": "haar", "use_adg": False, "cfg_interval_start": 0.0,
    "cfg_interval_end": 1.0, "cover_noise_strength": 0.0, "chunk_mask_mode": "auto", "repaint_mode": "balanced",
    "repaint_strength": 0.5, "repaint_latent_crossfade_frames": 10, "repaint_wav_crossfade_sec": 0.0,
    "retake_seed": None, "retake_variance": 0.0, "latent_shift": 0.0, "latent_rescale": 1.0,
    "enable_normalization": True, "normalization_db": -1.0, "fade_in_duration": 0.0, "fade_out_duration": 0.0,
    "extract_codes_only": False, "full_analysis_only": False, "analysis_only": False, "lora": None,
}


def test_defaults_are_the_seed_apis():
    assert GenerationRequest().model_dump() == SPEC_DEFAULTS | REFERENCE_DEFAULTS | SAMPLER_DEFAULTS


def test_the_spec_examples_validate():
    GenerationRequest(caption="upbeat pop song", lyrics="Hello world", inference_steps=16)
    GenerationRequest(caption="upbeat pop song", lyrics="Hello world", thinking=True, lm_temperature=0.85,
                    lm_cfg_scale=2.0, lm_top_k=None, lm_top_p=0.9, lm_repetition_penalty=1.0)
    assert GenerationRequest(caption="slow emotional ballad", lyrics="...", thinking=False, bpm=72).bpm == 72
    repaint = GenerationRequest(caption="remix this song", src_audio_path="jobs/x/input-src.mp3", task_type="repaint")
    assert repaint.task_type == "repaint"


def test_form_strings_are_coerced():
    req = GenerationRequest.model_validate({"inference_steps": "16", "thinking": "true", "bpm": "120"})
    assert (req.inference_steps, req.thinking, req.bpm) == (16, True, 120)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"bpm": 29}, "bpm"),
        ({"bpm": 301}, "bpm"),
        ({"audio_duration": 9.9}, "audio_duration"),
        ({"audio_duration": 601}, "audio_duration"),
        ({"inference_steps": 0}, "inference_steps"),
        ({"inference_steps": 201}, "inference_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 9}, "batch_size"),
        ({"audio_format": "ogg"}, "audio_format"),
        ({"task_type": "extract"}, "task_type"),
        ({"vocal_language": "xx"}, "vocal_language"),
        ({"key_scale": "H major"}, "key_scale"),
        ({"time_signature": "5/4"}, "time_signature"),
        ({"lm_backend": "tensorrt"}, "lm_backend"),
        ({"seed": -2}, "seed"),
        ({"audio_cover_strength": 1.5}, "audio_cover_strength"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"inference_steps": "many"}, "inference_steps"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"webhook_url": "not a url"}, "webhook_url"),
    ],
)
def test_field_rules_name_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.model_validate(body)
    assert field in {str(part) for err in caught.value.errors() for part in err["loc"]}


@pytest.mark.parametrize(
    "body,field,words",
    [
        ({"task_type": "cover"}, "task_type", "src_audio"),
        ({"task_type": "repaint"}, "task_type", "src_audio"),
        ({"repainting_start": 10, "repainting_end": 5}, "repainting_end", "repainting_start"),
        ({"repainting_start": 10, "repainting_end": 10}, "repainting_end", "repainting_start"),
        ({"audio_code_string": ["a", "b"], "batch_size": 3}, "batch_size", "audio_code_string"),
        ({"audio_code_string": []}, "audio_code_string", "1 to 8"),
    ],
)
def test_cross_field_rules_name_the_field(body, field, words):
    with pytest.raises(ValidationError, match=words) as caught:
        GenerationRequest.model_validate(body)
    assert [err["loc"] for err in caught.value.errors()] == [(field,)]


def test_repaint_to_the_end_and_code_lists():
    assert GenerationRequest(repainting_start=5, repainting_end=-1).repainting_end == -1
    codes = GenerationRequest(audio_code_string=["<|audio_code_1|>", "<|audio_code_2|>"])
    assert codes.effective_batch_size(default=2) == 2
    assert GenerationRequest(batch_size=3).effective_batch_size(default=2) == 3
    assert GenerationRequest().effective_batch_size(default=2) == 2


def test_stored_rows_round_trip_and_refuse_unknown_stored_keys():
    from pipeline.contract import request_document, request_from_row

    request = GenerationRequest(caption="x", audio_code_string=["a", "b"], bpm=90)
    document = request_document(request, inputs={}, batch_key="k")
    assert request_from_row(document) == request
    with pytest.raises(ValueError, match="not a stored key"):
        request_document(request, input_files={})


@pytest.mark.parametrize("field, value", [("caption", "a\x00b"), ("lyrics", "\x00"), ("audio_code_string", ["ok", "no\x00"])])
def test_nul_characters_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as refused:
        GenerationRequest.model_validate({field: value})
    assert [e["loc"][0] for e in refused.value.errors()] == [field] and "NUL" in str(refused.value)


def test_codes_for_the_longest_song_fit_and_more_is_refused():
    """600 s of audio is 3 000 codes of up to 20 characters: accepted alone or per batch item."""
    longest = "<|audio_code_63999|>" * (DURATION_MAX * 5)
    assert GenerationRequest(audio_code_string=longest).audio_code_string == longest
    assert GenerationRequest(audio_code_string=[longest, longest]).audio_code_string == [longest, longest]
    with pytest.raises(ValidationError) as refused:
        GenerationRequest(audio_code_string=longest + "x" * MAX_CODE_STRING_CHARS)
    assert all(error["loc"][0] == "audio_code_string" for error in refused.value.errors())
