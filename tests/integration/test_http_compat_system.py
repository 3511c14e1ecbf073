"""The reference API server's system routes over our queue: the envelope, /health, /v1/stats,
/v1/models (OpenRouter list), /v1/model_inventory, /v1/init, /v1/reinitialize, /v1/lora/*, CORS,
and the signed /v1/audio links (ranges, HEAD, forged and expired tokens), on local storage and S3."""

import io
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from db import DatabaseUnavailable
from handler.http.app import create_app
from handler.http.audio_links import audio_link, parse_range, RangeNotSatisfiable, ByteRange
from handler.http.auth import create_api_key
from handler.http.services import build_services
from handler.settings import Settings
from handler.storage import LocalStorage, S3Storage

TURBO, BASE, LM = "acestep-v15-turbo", "acestep-v15-base", "acestep-5Hz-lm-1.7B"
AUDIO = bytes(range(256)) * 40  # 10 240 bytes, every byte position distinguishable mod 256


STRONG_SECRET = "7f3a9c0e51b24d68a1e9f0c3b7d2e45a"


def make(tmp_path, db_url, **overrides):
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", **overrides)
    svc = build_services(settings, db_url)
    return svc, TestClient(create_app(svc))


@pytest.fixture
def api(tmp_path, db_url):
    return make(tmp_path, db_url)


def assert_envelope(body: dict, code: int = 200) -> None:
    assert set(body) >= {"data", "code", "error", "timestamp", "extra"}
    assert body["code"] == code and isinstance(body["timestamp"], int) and body["timestamp"] > 1_600_000_000_000
    assert (body["error"] is None) == (code == 200)


def live(svc, worker_id: str, models: list[str], *, now: datetime | None = None) -> None:
    svc.store.register_worker(worker_id, host="h", capacity=1, models=models, state="READY", now=now)


# --- /health, /v1/stats ---------------------------------------------------------------------


def test_health_is_the_reference_envelope_with_our_facts_inside(api):
    svc, client = api
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert_envelope(body)
    data = body["data"]
    # what clients read: the VST3 plugin and the DAW need data.status == "ok" (no worker yet: jobs still queue)
    assert data["status"] == "ok" and data["service"] == "ACE-Step API" and data["version"] == "1.0"
    assert data["models_initialized"] is False and data["loaded_model"] is None and data["llm_initialized"] is False
    assert data["database"] == "ok" and data["live_workers"] == 0 and data["models_loaded"] == []
    live(svc, "gpu-1", [TURBO, LM])
    data = client.get("/health").json()["data"]
    assert data["models_initialized"] is True and data["loaded_model"] == TURBO
    assert data["llm_initialized"] is True and data["loaded_lm_model"] == LM
    assert data["live_workers"] == 1 and data["worker_slots"] == 1 and data["models_loaded"] == [LM, TURBO]
    assert data["workers"] == [{"id": "gpu-1", "state": "READY", "alive": True, "models": [TURBO, LM]}]


def test_health_with_the_database_down_is_503_in_the_envelope(api, monkeypatch):
    svc, client = api

    def down(**_):
        raise DatabaseUnavailable("connection refused")

    monkeypatch.setattr(svc.store, "workers", down)
    response = client.get("/health")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    body = response.json()
    assert_envelope(body, 503)
    assert body["data"]["status"] == "unavailable" and body["data"]["database"] == "unavailable"
    assert "unavailable" in body["error"] and "connection refused" not in response.text  # no driver detail leaks


def test_stats_has_the_reference_fields(api):
    svc, client = api
    for caption in ("a", "b"):
        assert client.post("/v1/music/generate", json={"caption": caption}).status_code == 200
    body = client.get("/v1/stats").json()
    assert_envelope(body)
    data = body["data"]
    assert data["jobs"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    assert data["queue_size"] == 2 and data["queue_maxsize"] == svc.settings.max_queued_per_key
    assert isinstance(data["avg_job_seconds"], float) and data["avg_job_seconds"] > 0
    assert data["live_workers"] == 0


# --- /v1/models, /v1/model_inventory ----------------------------------------------------------


def test_models_is_the_openrouter_list_of_live_dits(api):
    svc, client = api
    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    started = datetime(2026, 6, 1, tzinfo=timezone.utc)
    live(svc, "gpu-1", [TURBO, LM], now=datetime.now(timezone.utc))
    live(svc, "gpu-old", [BASE], now=datetime.now(timezone.utc) - timedelta(hours=1))  # stale: not listed
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [f"acestep/{TURBO}"]  # no LM, no stale worker
    model = body["data"][0]
    assert model["name"] == f"ACE-Step {TURBO}" and isinstance(model["created"], int) and model["created"] > started.timestamp() - 86400 * 60
    assert model["input_modalities"] == ["text", "audio"] and model["output_modalities"] == ["audio", "text"]
    assert model["pricing"] == {"prompt": "0", "completion": "0", "request": "0", "image": "0"}
    assert model["context_length"] == 4096 and model["max_output_length"] == 600


def test_inventory_lists_served_models_with_their_task_types(api):
    svc, client = api
    body = client.get("/v1/model_inventory").json()
    assert_envelope(body)
    data = body["data"]
    # no worker: the configured default is listed (its jobs are accepted) but not loaded
    assert data["models"] == [{"name": TURBO, "is_default": True, "is_loaded": False,
                               "supported_task_types": ["text2music", "repaint", "cover", "cover-nofsq"]}]
    assert data["default_model"] == TURBO and data["lm_models"] == [] and data["llm_initialized"] is False
    live(svc, "gpu-1", [TURBO, LM])
    live(svc, "gpu-2", [BASE])
    data = client.get("/v1/model_inventory").json()["data"]
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name[TURBO] == {"name": TURBO, "is_default": True, "is_loaded": True,
                              "supported_task_types": ["text2music", "repaint", "cover", "cover-nofsq"]}
    assert by_name[BASE]["is_default"] is False and by_name[BASE]["is_loaded"] is True
    assert by_name[BASE]["supported_task_types"] == ["text2music", "repaint", "cover", "cover-nofsq", "extract", "lego",
                                                     "complete"]
    assert data["lm_models"] == [{"name": LM, "is_loaded": True}] and data["loaded_lm_model"] == LM
    assert data["llm_initialized"] is True
    # the DAW's rule for full-song generation: a loaded DiT that does text2music
    assert any(m["is_loaded"] and "text2music" in m["supported_task_types"] for m in data["models"])


# --- /v1/init, /v1/reinitialize -------------------------------------------------------------


def test_init_succeeds_only_for_what_live_workers_serve(api):
    svc, client = api
    refused = client.post("/v1/init", json={})
    assert refused.status_code == 409
    assert_envelope(refused.json(), 409)
    assert "no live worker" in refused.json()["error"]
    live(svc, "gpu-1", [TURBO, LM])

    ok = client.post("/v1/init", json={"model": TURBO})
    assert ok.status_code == 200
    body = ok.json()
    assert_envelope(body)
    data = body["data"]
    assert data["message"] == "Model initialization completed" and data["slot"] == 1
    assert data["loaded_model"] == TURBO and data["loaded_lm_model"] is None
    assert [m["name"] for m in data["models"]] == [TURBO] and data["lm_models"] == [{"name": LM, "is_loaded": True}]

    # the DAW's LM load: the DiT plus init_llm and the LM's name; paths and OpenRouter ids name the same folder
    data = client.post("/v1/init", json={"config_path": f"/ckpt/{TURBO}/", "init_llm": True, "lm_model_path": LM}).json()["data"]
    assert data["loaded_model"] == TURBO and data["loaded_lm_model"] == LM and data["llm_initialized"] is True
    assert client.post("/v1/init", json={"model": f"acestep/{TURBO}"}).status_code == 200
    assert client.post("/v1/init").json()["data"]["loaded_model"] == TURBO  # nothing named, a worker is live

    missing = client.post("/v1/init", json={"model": BASE})
    assert missing.status_code == 404
    assert_envelope(missing.json(), 404)
    assert BASE in missing.json()["error"] and f"served now: {TURBO}" in missing.json()["error"]
    no_lm = client.post("/v1/init", json={"model": TURBO, "init_llm": True, "lm_model_path": "acestep-5Hz-lm-4B"})
    assert no_lm.status_code == 404 and "acestep-5Hz-lm-4B" in no_lm.json()["error"] and LM in no_lm.json()["error"]

    bad = client.post("/v1/init", json={"slot": 7})
    assert bad.status_code == 422 and bad.json()["code"] == 422 and "slot" in bad.json()["error"]
    assert client.post("/v1/init", content=b"[1]", headers={"Content-Type": "application/json"}).status_code == 400


def test_reinitialize_needs_a_live_worker(api):
    svc, client = api
    refused = client.post("/v1/reinitialize")
    assert refused.status_code == 409 and refused.json()["code"] == 409
    live(svc, "gpu-1", [TURBO])
    body = client.post("/v1/reinitialize").json()
    assert_envelope(body)
    assert "Service reinitialized" in body["data"]["message"] and body["data"]["reloaded"] == []


# --- /v1/lora/* -------------------------------------------------------------------------------


def test_lora_routes_with_nothing_loaded(api):
    """A fresh key's adapter state in the reference's shapes (tests/integration/test_lora_api.py has the rest)."""
    _, client = api
    status = client.get("/v1/lora/status").json()
    assert_envelope(status)
    assert status["data"] == {"lora_loaded": False, "use_lora": False, "lora_scale": 1.0, "adapter_type": None,
                              "scales": {}, "active_adapter": None, "adapters": [], "synthetic_default_mode": False}

    load = client.post("/v1/lora/load", json={"lora_path": "adapters/singer", "adapter_name": "singer"})
    assert load.status_code == 400
    assert_envelope(load.json(), 400)
    assert "names no adapter" in load.json()["error"] and "adapters/singer" in load.json()["error"]
    assert client.post("/v1/lora/load", json={}).status_code == 422  # lora_path is required

    unload = client.post("/v1/lora/unload")
    assert unload.status_code == 200 and unload.json()["code"] == 200
    assert unload.json()["data"]["message"].startswith("\u26a0\ufe0f")  # the reference's warning: nothing was loaded

    for path, body in [("/v1/lora/toggle", {"use_lora": True}), ("/v1/lora/scale", {"scale": 0.5})]:
        answer = client.post(path, json=body)
        assert answer.status_code == 200, path  # the reference answers these in-band
        assert answer.json()["code"] == 400 and "No LoRA adapter is loaded" in answer.json()["error"] and answer.json()["data"] is None
    assert client.post("/v1/lora/scale", json={"scale": 2.5}).status_code == 422
    assert client.post("/v1/lora/toggle", json={}).status_code == 422


def test_model_routes_need_a_key_when_keys_are_on(tmp_path, db_url):
    svc, client = make(tmp_path, db_url, require_keys=True)
    _, key = create_api_key(svc.store, "alice")
    assert client.get("/health").status_code == 200  # open, for load balancers
    for method, path in [("GET", "/v1/stats"), ("GET", "/v1/models"), ("GET", "/v1/model_inventory"), ("POST", "/v1/init"),
                         ("POST", "/v1/reinitialize"), ("GET", "/v1/lora/status"), ("POST", "/v1/lora/unload")]:
        assert client.request(method, path).status_code == 401, path
    assert client.get("/v1/model_inventory", headers={"Authorization": f"Bearer {key}"}).status_code == 200


# --- CORS -----------------------------------------------------------------------------------


def preflight(client: TestClient, origin: str):
    return client.options("/health", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})


def test_cors_dev_default_allows_localhost_and_null_only(api):
    _, client = api
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://localhost", "null"):
        response = preflight(client, origin)
        assert response.status_code == 200, origin
        assert response.headers["access-control-allow-origin"] == origin
        assert "GET" in response.headers["access-control-allow-methods"]
    simple = client.get("/health", headers={"Origin": "http://localhost:5173"})
    assert simple.headers["access-control-allow-origin"] == "http://localhost:5173"
    denied = preflight(client, "https://evil.example")
    assert "access-control-allow-origin" not in denied.headers
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://evil.example"}).headers


def test_cors_production_default_is_none_and_the_setting_names_origins(tmp_path, db_url, monkeypatch):
    _, client = make(tmp_path, db_url, env="production", allow_open=True, secret_key=STRONG_SECRET)
    assert "access-control-allow-origin" not in preflight(client, "http://localhost:5173").headers

    monkeypatch.setenv("ACESTEP_CORS_ORIGINS", "https://studio.example.com/, null")
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data2", env="production", allow_open=True,
                        secret_key=STRONG_SECRET)
    assert settings.cors_origins == "https://studio.example.com,null"
    client = TestClient(create_app(build_services(settings, db_url)))
    allowed = preflight(client, "https://studio.example.com")
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://studio.example.com"
    assert "access-control-allow-origin" not in preflight(client, "http://localhost:5173").headers

    monkeypatch.setenv("ACESTEP_CORS_ORIGINS", "https://x.example/path")
    with pytest.raises(ValueError, match="cors_origins"):
        Settings()


# --- /v1/audio --------------------------------------------------------------------------------


def put_audio(svc, key: str) -> None:
    svc.storage.put(key, io.BytesIO(AUDIO), "audio/mpeg")


def token_of(link: str) -> str:
    return parse_qs(urlparse(link).query)["path"][0]


def check_audio_route(svc, client: TestClient, key: str) -> None:
    link = audio_link(svc, key)
    assert link.startswith("/v1/audio?path=") and "://" not in link
    assert key not in link and "jobs/" not in link  # opaque: neither the key nor a server path shows
    assert link.endswith(".mp3")  # clients that name downloads after the link get the right extension

    full = client.get(link)
    assert full.status_code == 200 and full.content == AUDIO
    assert full.headers["content-type"] == "audio/mpeg" and full.headers["content-length"] == str(len(AUDIO))
    assert full.headers["accept-ranges"] == "bytes"

    head = client.head(link)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(AUDIO)) and head.headers["content-type"] == "audio/mpeg"

    size = len(AUDIO)
    for header, start, end in [("bytes=0-9", 0, 9), ("bytes=1000-", 1000, size - 1), ("bytes=-5", size - 5, size - 1),
                               ("bytes=10000-99999", 10000, size - 1), ("bytes=-99999", 0, size - 1)]:
        part = client.get(link, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == AUDIO[start:end + 1], header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert part.headers["content-length"] == str(end - start + 1), header
    ranged_head = client.head(link, headers={"Range": "bytes=0-99"})
    assert ranged_head.status_code == 206 and ranged_head.headers["content-length"] == "100" and ranged_head.content == b""
    for header in (f"bytes={size}-", "bytes=-0"):
        unsatisfiable = client.get(link, headers={"Range": header})
        assert unsatisfiable.status_code == 416, header
        assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    assert client.get(link, headers={"Range": "bytes=5-2"}).status_code == 200  # invalid: ignored, whole file
    assert client.get(link, headers={"Range": "bytes=0-1,4-5"}).status_code == 200  # several ranges: whole file

    # forged and expired tokens: 403 with a clear message; a valid token for a missing object: 404
    token = token_of(link)
    encoded_key, expires, signature, ext = token.split(".")
    other = token_of(audio_link(svc, key.replace("output-0", "output-1")))
    for forged in (f"{encoded_key}.{expires}.{signature[:-2]}AA.{ext}",         # signature changed
                   f"{encoded_key}.{int(expires) + 3600}.{signature}.{ext}",    # expiry extended
                   f"{other.split('.')[0]}.{expires}.{signature}.{ext}",       # another file
                   f"{encoded_key}.{expires}.{signature}.wav",                 # extension changed
                   "%2Ftmp%2Fsecret.mp3", "a.b", ""):
        refused = client.get("/v1/audio", params={"path": forged})
        assert refused.status_code == 403, forged
        assert refused.json()["code"] == 403 and "audio link" in refused.json()["error"]
    expired = audio_link(svc, key, now=datetime.now(timezone.utc).timestamp() - 2 * svc.settings.url_expires_seconds)
    refused = client.get(expired)
    assert refused.status_code == 403 and "expired" in refused.json()["error"]
    missing = client.get(audio_link(svc, "jobs/nobody/output-0.mp3"))
    assert missing.status_code == 404 and missing.json()["code"] == 404


def test_audio_links_on_local_storage(tmp_path, db_url):
    svc, client = make(tmp_path, db_url, require_keys=True)  # the signature is the key: no API key needed
    assert isinstance(svc.storage, LocalStorage)
    key = "jobs/j1/output-0.mp3"
    put_audio(svc, key)
    check_audio_route(svc, client, key)


def test_audio_links_on_s3(tmp_path, db_url, s3_endpoint, s3_bucket):
    svc, client = make(tmp_path, db_url, storage_url=f"s3://{s3_bucket}/acestep", s3_endpoint_url=s3_endpoint)
    assert isinstance(svc.storage, S3Storage)
    key = "jobs/j2/output-0.mp3"
    put_audio(svc, key)
    assert svc.storage.size(key) == len(AUDIO)
    with svc.storage.open_range(key, 100, 199) as body:
        assert body.read() == AUDIO[100:200]
    check_audio_route(svc, client, key)


def test_local_ranged_reads(tmp_path):
    storage = LocalStorage(tmp_path, secret=b"s")
    storage.put("a/b.wav", io.BytesIO(AUDIO), "audio/wav")
    assert storage.size("a/b.wav") == len(AUDIO)
    with storage.open_range("a/b.wav", 250, 260) as body:
        assert body.read(4) == AUDIO[250:254] and body.read() == AUDIO[254:261] and body.read() == b""


def test_parse_range():
    assert parse_range(None, 100) is None and parse_range("items=0-1", 100) is None
    assert parse_range("bytes=0-0", 100) == ByteRange(0, 0)
    assert parse_range("bytes=90-", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99)
    assert parse_range("bytes=50-500", 100) == ByteRange(50, 99)
    for header in ("bytes=100-", "bytes=-0", "bytes=100-200"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 100)
