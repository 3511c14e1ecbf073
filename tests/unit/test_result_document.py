"""The result a worker writes, in the spec's example form (`generation_info` "Steps: 8, Scale: 7.0
...", `status_message` "✅ Generation completed successfully!"), with the LM's genres kept."""

from handler.worker.job_run import result_document
from pipeline.contract import GenerationRequest

KEYS = ["jobs/j/attempt-1/output-0.mp3", "jobs/j/attempt-1/output-1.mp3"]


def test_generation_info_and_status_message_follow_the_spec_example():
    request = GenerationRequest(inference_steps=8, guidance_scale=7)
    info = {"seed_value": "12345,12346", "generation_info": "acestep-v15-turbo: text2music, 2 x 30 s",
            "dit_model": "acestep-v15-turbo", "duration": 30.0}
    result = result_document(request, KEYS, info)
    assert result["generation_info"] == "Steps: 8, Scale: 7.0, Seeds: 12345,12346, acestep-v15-turbo: text2music, 2 x 30 s"
    assert result["status_message"] == "✅ Generation completed successfully!"
    assert result["seed_value"] == "12345,12346" and result["audio_keys"] == KEYS
    assert result["dit_model"] == "acestep-v15-turbo" and result["duration"] == 30.0


def test_a_pipeline_that_says_nothing_still_gets_steps_and_scale():
    result = result_document(GenerationRequest(inference_steps=16, guidance_scale=3.5), KEYS[:1], {})
    assert result["generation_info"] == "Steps: 16, Scale: 3.5"
    assert result["seed_value"] == "" and "genres" not in result


def test_genres_the_lm_wrote_reach_the_result():
    request = GenerationRequest()
    given = result_document(request, KEYS, {"genres": "pop, rock", "bpm": 120})
    assert given["genres"] == "pop, rock" and given["bpm"] == 120
    in_metas = result_document(request, KEYS, {"metas": {"bpm": 120, "genres": "synthwave"}})
    assert in_metas["genres"] == "synthwave" and in_metas["metas"] == {"bpm": 120, "genres": "synthwave"}
    for unknown in ("", "N/A", None):
        assert "genres" not in result_document(request, KEYS, {"metas": {"genres": unknown}})
