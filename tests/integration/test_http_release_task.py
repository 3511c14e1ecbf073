"""The reference's routes over the same jobs as the seed API: /release_task and /query_result (every
alias and source, upstream's precedence, options not acted on listed back, errors in the envelope),
the LM task routes that wait on a queue job, /v1/music/random and /v1/chat/completions."""

import base64
import json

import httpx
import pytest

from handler.http.reference_request import generation_fields
from handler.settings import Settings
from tests.integration.http_harness import FakeWorker, audio_bytes, free_port, run_fake_jobs, start_api


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), sync_timeout_seconds=20), db_url)
    yield live
    live.stop()


def query(client, *task_ids, as_string=False):
    ids = json.dumps(list(task_ids)) if as_string else list(task_ids)
    response = client.post("/query_result", json={"task_id_list": ids})
    assert response.status_code == 200, response.text
    return response.json()


def stored(api, task_id: str) -> dict:
    return api.services.store.get(task_id)["request"]


def test_release_then_query_until_done_and_download_as_the_reference_client_does(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        created = client.post("/release_task", json={"prompt": "upbeat pop song", "lyrics": "Hello world",
                                                      "infer_method": "ode", "use_tiled_decode": True,
                                                      "model": "acestep-v15-turbo", "audio_duration": 30})
        assert created.status_code == 200, created.text
        body = created.json()
        assert (body["code"], body["error"]) == (200, None)
        assert body["extra"] == {"not_applied": {"use_tiled_decode": True}}  # infer_method is a request field now
        assert body["data"]["status"] == "queued" and body["data"]["queue_position"] == 1
        task_id = body["data"]["task_id"]

        pending = query(client, task_id)["data"][0]
        assert pending["status"] == 0 and json.loads(pending["result"])[0]["status"] == 0

        run_fake_jobs(api.services.store, api.services.storage)
        done = query(client, task_id, as_string=True)["data"][0]
        assert done["task_id"] == task_id and done["status"] == 1
        items = json.loads(done["result"])
        assert len(items) == 2 and all(item["status"] == 1 for item in items)
        assert items[0]["prompt"] == "upbeat pop song" and items[0]["metas"]["duration"] == 30.0
        assert items[0]["seed_value"] == "1000,1001" and items[0]["stage"] == "succeeded"
        # `file` is relative (clients append it to their base URL), an opaque token, never a path.
        assert items[0]["file"].startswith("/v1/audio?path=") and "jobs/" not in items[0]["file"]
        audio = client.get(items[0]["file"])
        key = api.services.store.get(task_id)["result"]["audio_keys"][0]
        with api.services.storage.open(key) as stored_file:
            assert audio.status_code == 200 and audio.content == stored_file.read()
        assert items[0]["url"].startswith("http") and httpx.get(items[0]["url"]).content == audio.content
        assert client.get(f"/v1/jobs/{task_id}").json()["status"] == "succeeded"


def test_unknown_tasks_answer_as_the_reference_does(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        data = query(client, "00000000-0000-0000-0000-000000000000", "nonsense")["data"]
    assert [(d["status"], d["result"], d["progress_text"]) for d in data] == [(0, "[]", "task not found")] * 2


def test_aliases_sources_and_precedence(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        # An Android-style form: ai_token, prompt and caption together (prompt wins), camelCase and
        # short aliases, metas as a JSON string, an empty model, seeds as text, key "Am".
        form = {"ai_token": "", "prompt": "dreamy synth pop", "caption": "ignored", "keyScale": "Am",
                "duration": "20", "language": "ja", "timeSignature": "3", "inferenceSteps": "6",
                "seed": "42,43", "useRandomSeed": "false", "model": "", "thinking": "1", "batch_size": "2",
                "metas": json.dumps({"bpm": 96, "duration": 99}), "coverStrength": "0.5", "shift": "3.0",
                "negative_prompt": "noise"}
        created = client.post("/release_task", data=form)
        assert created.status_code == 200, created.text
        request = stored(api, created.json()["data"]["task_id"])
        assert request["caption"] == "dreamy synth pop" and request["key_scale"] == "A minor"
        assert request["audio_duration"] == 20.0  # the flat body beats the metas object
        assert request["bpm"] == 96 and request["vocal_language"] == "ja" and request["time_signature"] == "3"
        assert request["inference_steps"] == 6 and request["seed"] == [42, 43] and request["use_random_seed"] is False
        assert request["thinking"] is True and request["audio_cover_strength"] == 0.5
        assert request["lm_cfg_scale"] == 2.5  # the reference's default for this route
        assert created.json()["extra"]["not_applied"] == {"negative_prompt": "noise"}
        assert request["shift"] == 3.0  # upstream's sampler options are applied

        nested = client.post("/release_task", json={"param_obj": {"caption": "lofi", "bpm": 80, "key": "F#m"},
                                                     "sample_query": "", "description": "a sea shanty",
                                                     "model_name": "acestep-v15-turbo", "ctx_audio_path": None})
        assert nested.status_code == 200, nested.text
        request = stored(api, nested.json()["data"]["task_id"])
        assert (request["caption"], request["bpm"], request["key_scale"]) == ("lofi", 80, "F# minor")
        # As the reference reads it: a present (even empty) sample_query wins over its alias.
        assert request["sample_query"] == ""
        aliased = client.post("/release_task", json={"description": "a sea shanty", "format": "true"})
        request = stored(api, aliased.json()["data"]["task_id"])
        assert (request["sample_query"], request["use_format"]) == ("a sea shanty", True)


def test_release_task_uploads_and_refusals_in_the_envelope(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        upload = client.post("/release_task", data={"prompt": "remix", "task_type": "cover"},
                             files={"ctx_audio": ("a.wav", audio_bytes(), "audio/wav")})
        assert upload.status_code == 200, upload.text
        task_id = upload.json()["data"]["task_id"]
        assert api.services.store.get(task_id)["request"]["inputs"]["src"]["key"].endswith("input-src.wav")
        for body, field in [({"model": "acestep-v15-nonexistent"}, "model"), ({"bpm": 1000}, "bpm"),
                            ({"bpm": "fast"}, "bpm"), ({"keyscale": "H major"}, "key_scale"),
                            ({"language": "xx"}, "vocal_language"), ({"seed": "1,x"}, "seed")]:
            refused = client.post("/release_task", json=body)
            assert refused.status_code == 422, body
            answer = refused.json()
            assert answer["code"] == 422 and answer["data"] is None and field in answer["error"], answer
            assert answer["detail"][0]["field"] == field
        bad_ids = client.post("/query_result", json={"task_id_list": 5})
        assert bad_ids.status_code == 422 and bad_ids.json()["code"] == 422
    assert api.services.store.stats()["queue_depth"] == 1


def test_the_builder_lists_unknown_fields_and_reads_flags_as_the_reference():
    fields, model, not_applied = generation_fields({"thinking": "yes", "use_format": "off", "sampleMode": "on",
                                                     "cot_caption": "0", "dit_model": "acestep-v15-turbo",
                                                     "made_up": 1, "ai_token": "t", "instruments": "drums"})
    assert (fields["thinking"], fields["use_format"], fields["sample_mode"], fields["use_cot_caption"]) == (True, False, True, False)
    assert model == "acestep-v15-turbo" and not_applied == {"made_up": 1}
    assert fields["track_classes"] == ["drums"]
    fields, _, _ = generation_fields({"audioFormat": "WAV32", "lmBackend": "mlx", "lm_cfg_scale": "3"})
    assert (fields["audio_format"], fields["lm_backend"], fields["lm_cfg_scale"]) == ("wav", "pt", 3.0)


def test_lm_task_routes_wait_for_their_queue_job(api):
    with httpx.Client(base_url=api.url, timeout=60) as client, FakeWorker(api.services.store, api.services.storage):
        formatted = client.post("/format_input", json={"prompt": "pop rock", "lyrics": "Walking down the street",
                                                        "temperature": 0.7,
                                                        "param_obj": json.dumps({"duration": 180, "language": "en", "key": "Am"})})
        assert formatted.status_code == 200, formatted.text
        data = formatted.json()["data"]
        assert data["caption"] == "formatted: pop rock"
        assert data["params"] | {"caption": "pop rock", "audio_duration": 180.0, "vocal_language": "en",
                                 "key_scale": "A minor", "lm_temperature": 0.7} == data["params"]
        sample = client.post("/v1/create_sample", json={"query": "a calm piano ballad", "instrumental": True})
        assert sample.status_code == 200, sample.text
        assert sample.json()["data"]["params"]["query"] == "a calm piano ballad"
        assert sample.json()["data"]["params"]["instrumental"] is True
        bad = client.post("/format_input", json={"prompt": "x", "param_obj": {"bpm": 5000}})
        assert bad.status_code == 422 and "bpm" in bad.json()["error"]


def test_an_lm_task_nobody_runs_times_out_and_is_canceled(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), sync_timeout_seconds=0.5), db_url)
    try:
        answer = httpx.post(f"{live.url}/format_input", json={"prompt": "x"}, timeout=30)
        assert answer.status_code == 504 and "canceled" in answer.json()["error"]
        assert live.services.store.stats()["queue_depth"] == 0
    finally:
        live.stop()


def test_random_sample_and_the_older_random_route(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for sample_type in ("simple_mode", "custom_mode"):
            example = client.post("/create_random_sample", json={"sample_type": sample_type}).json()["data"]
            assert {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"} <= set(example)
        assert client.post("/create_random_sample", json={"sample_type": "x"}).status_code == 422
        job = client.post("/v1/music/random", json={"thinking": False})
        assert job.status_code == 200, job.text
        request = stored(api, job.json()["job_id"])
        assert request["sample_mode"] is True and request["thinking"] is False


def test_chat_completions_answer_with_the_song(api):
    song = base64.b64encode(audio_bytes()).decode()
    with httpx.Client(base_url=api.url, timeout=60) as client, FakeWorker(api.services.store, api.services.storage):
        answer = client.post("/v1/chat/completions", json={
            "model": "acestep/acestep-v15-turbo",
            "messages": [{"role": "user", "content": "<prompt>warm jazz trio</prompt><lyrics>[verse]\nla la</lyrics>"}],
            "audio_config": {"duration": 20, "format": "wav", "bpm": 90}, "seed": 7})
        assert answer.status_code == 200, answer.text
        message = answer.json()["choices"][0]["message"]
        assert message["role"] == "assistant" and "warm jazz trio" in message["content"]
        url = message["audio"][0]["audio_url"]["url"]
        assert url.startswith("data:audio/wav;base64,") and base64.b64decode(url.split(",", 1)[1])[:4] == b"RIFF"
        request = stored(api, answer.json()["job_id"])
        assert (request["caption"], request["lyrics"], request["audio_duration"], request["bpm"]) == (
            "warm jazz trio", "[verse]\nla la", 20.0, 90)
        assert request["seed"] == 7 and request["use_random_seed"] is False and request["batch_size"] == 1

        cover = client.post("/v1/chat/completions", json={"task_type": "cover", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "make it a bossa nova"},
            {"type": "input_audio", "input_audio": {"data": song, "format": "wav"}}]}]})
        assert cover.status_code == 200, cover.text
        assert stored(api, cover.json()["job_id"])["inputs"]["src"]["key"].endswith("input-src.wav")

        with client.stream("POST", "/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "ambient drone"}]}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert any("audio" in c["choices"][0]["delta"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
