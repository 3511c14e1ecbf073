"""Input validation (issue 16, items 8, 9, 23): NUL characters, non-finite and huge numbers, deep
nesting and wrong types are refused with a 4xx naming the field on every submit route and encoding,
never a 500; lm_top_p lies in (0, 1]; the form value "null" is null where the spec allows it."""

import json

import httpx
import pytest

from handler.settings import Settings
from tests.integration.http_harness import free_port, start_api


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), max_upload_mb=1), db_url)
    yield live
    live.stop()


def fields_named(response) -> str:
    return json.dumps(response.json().get("detail"))


@pytest.mark.parametrize("field, value", [
    ("caption", "a\u0000b"), ("lyrics", "\u0000"), ("src_audio_path", "/x\u0000y"), ("lm_model_path", "a\u0000"),
    ("webhook_url", "http://example.com/\u0000"), ("track_classes", ["vocals", "dr\u0000ums"]),
    ("lm_top_p", float("inf")), ("guidance_scale", float("nan")), ("lm_temperature", float("-inf")),
    ("repainting_start", float("nan")), ("audio_duration", float("inf")), ("lm_top_p", 1.5), ("lm_top_p", 0),
])
def test_nul_and_non_finite_values_are_refused_naming_the_field(api, field, value):
    body = json.dumps({field: value})  # json.dumps writes NaN / Infinity, as such clients do
    with httpx.Client(base_url=api.url, timeout=30) as client:
        response = client.post("/v1/music/generate", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and field in fields_named(response), response.text
        if not isinstance(value, list):
            form = client.post("/v1/music/generate", data={field: str(value)})
            assert form.status_code == 422 and field in fields_named(form), form.text
        reference = client.post("/release_task", content=body, headers={"Content-Type": "application/json"})
        assert reference.status_code == 422 and field in reference.text, reference.text


def test_overflowing_numbers_are_refused_not_stored(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for text in ('{"lm_top_p": 1e309}', '{"lm_cfg_scale": -1e309}', '{"seed": 1e309}',
                     '{"bpm": 1' + "0" * 5000 + "}", '{"lm_top_k": 1e400}'):
            response = client.post("/v1/music/generate", content=text, headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (text[:40], response.text)
            reference = client.post("/release_task", content=text, headers={"Content-Type": "application/json"})
            assert 400 <= reference.status_code < 500, (text[:40], reference.text)
    assert api.services.store.stats()["counts"] == {}


def test_deep_nesting_is_a_client_error_on_every_json_route(api):
    deep = b"[" * 100_000
    deep_object = b'{"caption": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for route in ("/v1/music/generate", "/release_task", "/query_result", "/format_input", "/v1/create_sample",
                      "/v1/music/random", "/v1/chat/completions"):
            for body in (deep, deep_object):
                response = client.post(route, content=body, headers={"Content-Type": "application/json"})
                assert 400 <= response.status_code < 500, (route, response.status_code, response.text[:200])
        # Nesting inside a JSON string field (param_obj, metas, task_id_list) is no source, not a 500.
        for body in ({"param_obj": "[" * 100_000}, {"metas": "{\"a\":" * 50_000}, {"track_classes": "[" * 100_000}):
            response = client.post("/release_task", json=body)
            assert response.status_code < 500, response.text[:200]
        assert client.post("/query_result", json={"task_id_list": "[" * 100_000}).status_code < 500  # one odd id


def test_unknown_reference_options_with_non_finite_values_are_listed_back_as_text(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        response = client.post("/release_task", content=b'{"prompt": "x", "mystery": NaN, "other": [Infinity]}',
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        assert response.json()["extra"]["not_applied"] == {"mystery": "nan", "other": ["inf"]}


def test_the_form_value_null_is_null_where_the_spec_allows_it(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        response = client.post("/v1/music/generate", data={"bpm": "null", "audio_duration": "null", "batch_size": "null",
                                                            "lm_top_k": "null", "repainting_end": "null",
                                                            "track_name": "null", "webhook_url": "null"})
        assert response.status_code == 200, response.text
        request = api.services.store.get(response.json()["job_id"])["request"]
        assert request["bpm"] is None and request["audio_duration"] is None and request["webhook_url"] is None
        assert client.post("/v1/music/generate", data={"caption": "null"}).status_code == 200  # text stays text
        assert client.post("/v1/music/generate", data={"inference_steps": "null"}).status_code == 422  # not nullable


# ---- the fuzz corpus --------------------------------------------------------------------------

NASTY = ["\u0000", "a\u0000", "NaN", "Infinity", "-Infinity", "1e309", "-1e309", "null", "", " ", "[]", "{}",
         "9" * 400, "-1", "0", "1e-400", "true", "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
         "../../etc/passwd", "jobs/00000000-0000-0000-0000-000000000000/..", "s3://x/y", "http://[::1", "%00"]
NASTY_JSON = [None, True, 0, -1, 2**63, 10**300, 1e308, [], {}, [[[]]], {"a": {"b": {}}}, "x" * 30_000]
RAW_JSON = [b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e309", b"1" + b"0" * 4400, b"[" * 50 + b"]" * 50]
FIELDS = ["caption", "lyrics", "bpm", "audio_duration", "inference_steps", "guidance_scale", "seed", "batch_size",
          "lm_top_p", "lm_top_k", "lm_temperature", "src_audio_path", "reference_audio_path", "task_type",
          "repainting_start", "repainting_end", "audio_code_string", "track_classes", "webhook_url", "key_scale",
          "time_signature", "vocal_language", "thinking", "audio_format", "lm_model_path", "use_random_seed"]
REFERENCE_FIELDS = ["prompt", "duration", "key", "param_obj", "metas", "ai_token", "task_id_list", "model", "bpm",
                    "lmTopP", "audioDuration", "ctx_audio_path", "seed", "batchSize"]


def test_a_corpus_of_nasty_values_gives_no_server_error(api):
    """NUL, non-finite and huge numbers, deep nesting and wrong types in every field, as JSON,
    form and multipart, on /v1/music/generate and /release_task: 0 responses >= 500."""
    failures, sent = [], 0
    with httpx.Client(base_url=api.url, timeout=30) as client:
        def check(route: str, **kwargs) -> None:
            nonlocal sent
            sent += 1
            response = client.post(route, **kwargs)
            if response.status_code >= 500:
                failures.append((route, str(kwargs)[:160], response.status_code, response.text[:200]))

        for route, fields in (("/v1/music/generate", FIELDS), ("/release_task", REFERENCE_FIELDS + FIELDS)):
            for field in fields:
                for value in NASTY:
                    check(route, content=json.dumps({field: value}).encode(), headers={"Content-Type": "application/json"})
                    check(route, data={field: value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")})
                    check(route, data={field: value.replace("\ud800", "")}, files={"unknown": ("a", b"x", "audio/wav")})
                for value in NASTY_JSON:
                    check(route, content=json.dumps({field: value}).encode(), headers={"Content-Type": "application/json"})
                for raw in RAW_JSON:
                    check(route, content=b'{"' + field.encode() + b'": ' + raw + b"}",
                          headers={"Content-Type": "application/json"})
            for body in (b"[" * 100_000, b"{" * 100_000, b'"\\u0000"', b"NaN", b"[]", b"\xff\xfe", b'{"a":1}' * 3):
                check(route, content=body, headers={"Content-Type": "application/json"})
                check(route, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert sent > 2000
    assert not failures, failures[:10]
