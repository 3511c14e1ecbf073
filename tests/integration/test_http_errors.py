"""One error shape on our /v1 routes, whatever refused the request, and the reference's envelope on
its routes: `{"detail": [{"field", "message"}]}` with FastAPI's status codes."""

import io
from uuid import uuid4

import pytest
from fastapi.testclient import TestClient

from db import DatabaseUnavailable
from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings
from tests.integration.http_harness import audio_bytes


def make(tmp_path, db_url, **overrides):
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", **overrides)
    svc = build_services(settings, db_url)
    return svc, TestClient(create_app(svc))


@pytest.fixture
def api(tmp_path, db_url):
    return make(tmp_path, db_url, max_upload_mb=1, max_queued_per_key=2)


def assert_one_shape(response, status: int, field: str) -> str:
    """The response is `status` in the one shape, naming `field`; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"}, body
    assert body["detail"] and all(set(p) == {"field", "message"} for p in body["detail"]), body
    assert all(isinstance(p["field"], str) and isinstance(p["message"], str) and p["message"] for p in body["detail"])
    fields = [p["field"] for p in body["detail"]]
    assert field in fields, body
    return body["detail"][fields.index(field)]["message"]


def assert_envelope_refusal(response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"data", "code", "error", "timestamp", "extra"} and body["code"] == status and body["error"]


def test_validation_of_body_fields_and_of_query_parameters(api):
    _, client = api
    assert "300" in assert_one_shape(client.post("/v1/music/generate", json={"bpm": 400}), 422, "bpm")
    assert_one_shape(client.post("/v1/music/generate", json={"no_such_field": 1}), 422, "no_such_field")
    # FastAPI's own parameter checks answer in the same shape (not FastAPI's loc/msg/type)
    assert_one_shape(client.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    assert_one_shape(client.post("/v1/music/generate", json={}, headers={"Idempotency-Key": "k" * 300}), 422,
                     "Idempotency-Key")


def test_unknown_job_bad_body_and_content_type(api):
    _, client = api
    assert_one_shape(client.get(f"/v1/jobs/{uuid4()}"), 404, "job_id")
    assert_one_shape(client.get("/v1/jobs/not-a-uuid"), 404, "job_id")
    assert_one_shape(client.post(f"/v1/jobs/{uuid4()}/cancel"), 404, "job_id")
    assert_one_shape(client.post("/v1/music/generate", content=b"{not json", headers={"Content-Type": "application/json"}),
                     400, "body")
    assert_one_shape(client.post("/v1/music/generate", content=b"x", headers={"Content-Type": "text/plain"}),
                     415, "Content-Type")
    assert_one_shape(client.get("/v1/no-such-route"), 404, "request")


def test_bad_input_path_too_large_and_quota(api):
    _, client = api
    assert_one_shape(client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": "/etc/passwd"}),
                     400, "src_audio_path")
    too_big = client.post("/v1/music/generate", data={"task_type": "cover"},
                          files={"src_audio": ("x.wav", audio_bytes("wav", seconds=6), "audio/wav")})
    assert_one_shape(too_big, 413, "src_audio")
    huge = b'{"caption": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    assert_one_shape(client.post("/v1/music/generate", content=huge, headers={"Content-Type": "application/json"}),
                     413, "body")
    assert client.post("/v1/music/generate", json={}, headers={"Idempotency-Key": "a"}).status_code == 200
    assert_one_shape(client.post("/v1/music/generate", json={"caption": "other"}, headers={"Idempotency-Key": "a"}),
                     409, "Idempotency-Key")
    assert client.post("/v1/music/generate", json={}).status_code == 200
    full = client.post("/v1/music/generate", json={})  # max_queued_per_key=2
    assert_one_shape(full, 429, "request")
    assert int(full.headers["Retry-After"]) > 0


def test_keys_refused_in_the_one_shape_and_in_the_envelope_on_reference_routes(tmp_path, db_url):
    _, client = make(tmp_path, db_url, require_keys=True)
    for method, path in [("POST", "/v1/music/generate"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{uuid4()}"),
                         ("POST", "/v1/music/random")]:
        response = client.request(method, path, json={})
        assert_one_shape(response, 401, "Authorization")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_one_shape(client.get("/v1/jobs", headers={"Authorization": "Bearer ace_wrong"}), 401, "Authorization")
    for method, path in [("POST", "/release_task"), ("POST", "/query_result"), ("GET", "/v1/stats"),
                         ("GET", "/v1/models"), ("POST", "/format_input")]:
        assert_envelope_refusal(client.request(method, path, json={}), 401)


def test_database_outage_is_503_in_the_shape_of_each_route(api, monkeypatch):
    svc, client = api

    def down(*_, **__):
        raise DatabaseUnavailable("connection refused")

    monkeypatch.setattr(svc.store, "get", down)
    response = client.get(f"/v1/jobs/{uuid4()}")
    assert "retry" in assert_one_shape(response, 503, "request")
    assert response.headers["Retry-After"] == "5" and "connection refused" not in response.text
    reference = client.post("/query_result", json={"task_id_list": [str(uuid4())]})
    assert_envelope_refusal(reference, 503)
    assert "connection refused" not in reference.text


def test_reference_routes_keep_the_envelope_for_parameter_checks(api):
    _, client = api
    assert_envelope_refusal(client.get("/v1/audio"), 422)  # no `path`
    refused = client.post("/release_task", json={"bpm": 1000})
    assert_envelope_refusal(refused, 422)
    assert refused.json()["detail"][0]["field"] == "bpm"


def test_upload_that_is_not_audio_names_its_field(api):
    _, client = api
    response = client.post("/v1/music/generate", data={"task_type": "cover"},
                           files={"src_audio": ("x.mp3", io.BytesIO(b"not audio" * 100), "audio/mpeg")})
    assert "decodable audio" in assert_one_shape(response, 400, "src_audio")


def test_chat_completions_and_the_older_random_route_use_the_one_shape(api):
    _, client = api
    assert_one_shape(client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_one_shape(client.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
    assert_one_shape(client.post("/v1/music/random", json={"bpm": 1000}), 422, "bpm")
