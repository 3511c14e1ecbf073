"""The seed API over real HTTP: the spec's curl examples end to end, bad input, paths, idempotency."""

import io
from datetime import datetime, timedelta, timezone
import json
import time
from urllib.parse import urlparse
from pathlib import Path

import httpx
import pytest
import soundfile
from sqlalchemy import text

from handler.settings import Settings
from tests.integration.http_harness import FakeWorker, audio_bytes, free_port, start_api


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    (tmp_path / "inputs").mkdir()
    return Settings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        port=free_port(),
        input_root=tmp_path / "inputs",
        max_upload_mb=1,
        max_queued_per_key=1000,
    )


@pytest.fixture
def api(settings, db_url):
    live = start_api(settings, db_url)
    yield live
    live.stop()


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


def objects(settings: Settings) -> list[Path]:
    root = settings.data_dir / "objects"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def job_rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar()


def poll(client: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def assert_downloads_audio(url: str) -> None:
    response = httpx.get(url, timeout=10)  # a plain GET, no credentials
    assert response.status_code == 200, response.text
    info = soundfile.info(io.BytesIO(response.content))
    assert info.samplerate == 48000 and info.channels == 2


# The spec's three JSON curl bodies, byte for byte.
SPEC_JSON_EXAMPLES = [
    """{
    "caption": "upbeat pop song",
    "lyrics": "Hello world",
    "inference_steps": 16
  }""",
    """{
    "caption": "upbeat pop song",
    "lyrics": "Hello world",
    "thinking": true,
    "lm_temperature": 0.85,
    "lm_cfg_scale": 2.0,
    "lm_top_k": null,
    "lm_top_p": 0.9,
    "lm_repetition_penalty": 1.0
  }""",
    """{
    "caption": "slow emotional ballad",
    "lyrics": "...",
    "thinking": false,
    "bpm": 72
  }""",
]


@pytest.mark.parametrize("raw", SPEC_JSON_EXAMPLES)
def test_spec_json_examples_complete_and_their_audio_downloads(api, client, raw):
    body = json.loads(raw)
    submitted = client.post("/v1/music/generate", content=raw, headers={"Content-Type": "application/json"})
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["status"] == "queued" and submitted.json()["queue_position"] == 1
    queued = client.get(f"/v1/jobs/{submitted.json()['job_id']}").json()
    assert queued["queue_position"] == 1 and queued["eta_seconds"] > 0 and queued["result"] is None
    with FakeWorker(api.services.store, api.services.storage):
        done = poll(client, submitted.json()["job_id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["queue_position"] == 0
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    result = done["result"]
    assert len(result["audio_paths"]) == 2  # the server's default batch
    assert result["first_audio_path"] == result["audio_paths"][0]
    assert result["second_audio_path"] == result["audio_paths"][1]
    assert urlparse(result["audio_paths"][0]).path.endswith(".mp3")
    assert result["seed_value"] == "1000,1001"
    assert result["generation_info"].startswith(f"Steps: {body.get('inference_steps', 8)}")
    if body.get("bpm"):
        assert result.get("bpm") is None  # the user gave it, so the LM filled nothing
    else:
        assert result["bpm"] == 120 and result["keyscale"] == "C major"
    for url in result["audio_paths"]:
        assert_downloads_audio(url)


def test_json_sent_without_its_content_type_is_still_json(api, client):
    # The spec's note: `curl -d '{...}'` without -H sends application/x-www-form-urlencoded.
    response = client.post("/v1/music/generate", content=SPEC_JSON_EXAMPLES[0],
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert api.services.store.get(response.json()["job_id"])["request"]["inference_steps"] == 16


def test_spec_form_example(api, client):
    response = client.post(
        "/v1/music/generate",
        content="caption=upbeat%20pop%20song&lyrics=Hello%20world&inference_steps=16",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert api.services.store.get(job_id)["request"]["inference_steps"] == 16
    with FakeWorker(api.services.store, api.services.storage):
        assert poll(client, job_id)["status"] == "succeeded"


def test_spec_upload_example_stores_the_source_before_the_row(api, client, settings):
    response = client.post(
        "/v1/music/generate",
        data={"caption": "remix this song", "task_type": "repaint"},
        files={"src_audio": ("song.mp3", audio_bytes("mp3"), "audio/mpeg")},
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    request = api.services.store.get(job_id)["request"]
    key = f"jobs/{job_id}/input-src.mp3"
    assert request["inputs"] == {"src": {"key": key}} and request["src_audio_path"] == key
    assert api.services.storage.open(key).read() == audio_bytes("mp3")
    with FakeWorker(api.services.store, api.services.storage):
        done = poll(client, job_id)
    assert done["status"] == "succeeded"
    assert_downloads_audio(done["result"]["first_audio_path"])


def test_other_content_types_get_415_naming_the_accepted_ones(client, engine):
    response = client.post("/v1/music/generate", content="caption: x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    [problem] = response.json()["detail"]
    assert problem["field"] == "Content-Type"
    assert "application/json" in problem["message"] and "multipart/form-data" in problem["message"]
    assert job_rows(engine) == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"caption": "x"'])
def test_malformed_json_is_400(client, engine, raw):
    response = client.post("/v1/music/generate", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert job_rows(engine) == 0


BAD_BODIES = [
    ({"bpm": 10}, "bpm"),
    ({"bpm": 400}, "bpm"),
    ({"audio_duration": 5}, "audio_duration"),
    ({"audio_duration": 601}, "audio_duration"),
    ({"inference_steps": 0}, "inference_steps"),
    ({"inference_steps": 500}, "inference_steps"),
    ({"batch_size": 9}, "batch_size"),
    ({"audio_format": "ogg"}, "audio_format"),
    ({"task_type": "lego"}, "task_type"),
    ({"task_type": "cover"}, "task_type"),
    ({"task_type": "repaint"}, "task_type"),
    ({"repainting_start": 20, "repainting_end": 10}, "repainting_end"),
    ({"audio_code_string": ["a", "b"], "batch_size": 3}, "batch_size"),
    ({"seed": "abc"}, "seed"),
    ({"no_such_field": 1}, "no_such_field"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
def test_each_validation_rule_is_a_422_naming_the_field_and_changes_nothing(client, engine, settings, body, field):
    response = client.post("/v1/music/generate", json=body)
    assert response.status_code == 422
    assert field in [d["field"] for d in response.json()["detail"]]
    assert job_rows(engine) == 0 and objects(settings) == []


def test_upload_checks_change_nothing(client, engine, settings):
    not_audio = client.post("/v1/music/generate", data={"task_type": "cover"},
                            files={"src_audio": ("x.mp3", b"this is not audio" * 100, "audio/mpeg")})
    assert not_audio.status_code == 400 and not_audio.json()["detail"][0]["field"] == "src_audio"
    too_big = client.post("/v1/music/generate", data={"task_type": "cover"},
                          files={"src_audio": ("x.wav", audio_bytes("wav", seconds=6), "audio/wav")})
    assert too_big.status_code == 413
    unknown = client.post("/v1/music/generate", files={"lyrics_file": ("x.wav", audio_bytes(), "audio/wav")})
    assert unknown.status_code == 422
    # A valid upload with an invalid field: rejected before anything is stored.
    invalid = client.post("/v1/music/generate", data={"task_type": "cover", "bpm": "1000"},
                          files={"src_audio": ("x.wav", audio_bytes(), "audio/wav")})
    assert invalid.status_code == 422
    assert job_rows(engine) == 0 and objects(settings) == []


def test_source_paths_only_under_the_input_root_or_own_objects(api, client, settings, engine):
    inside = settings.input_root / "song.wav"
    inside.write_bytes(audio_bytes())
    accepted = client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": str(inside)})
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["job_id"]
    assert api.services.store.get(job_id)["request"]["inputs"] == {"src": {"path": str(inside)}}

    for bad in ["/etc/passwd", str(settings.input_root / ".." / "elsewhere.wav"), str(settings.input_root / "missing.wav"),
                "jobs/00000000-0000-0000-0000-000000000000/output-0.mp3", "s3://someone-elses-bucket/x.mp3", "../x.wav"]:
        refused = client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": bad})
        assert refused.status_code == 400, bad
        assert refused.json()["detail"][0]["field"] == "src_audio_path"
    own_key = f"jobs/{job_id}/input-src.wav"
    api.services.storage.put(own_key, io.BytesIO(audio_bytes()), "audio/wav")  # a file the job holds
    reuse = client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": own_key})
    assert reuse.status_code == 200
    assert job_rows(engine) == 2


def test_idempotency_key_returns_the_same_job(client, engine):
    headers = {"Idempotency-Key": "order-17"}
    first = client.post("/v1/music/generate", json={"caption": "a"}, headers=headers)
    again = client.post("/v1/music/generate", json={"caption": "a"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["job_id"] == again.json()["job_id"]
    other = client.post("/v1/music/generate", json={"caption": "b"}, headers=headers)
    assert other.status_code == 409
    assert job_rows(engine) == 1


def test_unknown_jobs_are_404(client):
    assert client.get("/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    assert client.get("/v1/jobs/not-a-uuid").status_code == 404
    assert client.post("/v1/jobs/not-a-uuid/cancel").status_code == 404


def test_queue_positions_cancel_and_listing(client):
    ids = [client.post("/v1/music/generate", json={"caption": str(i)}).json()["job_id"] for i in range(5)]
    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [1, 2, 3, 4, 5]
    canceled = client.post(f"/v1/jobs/{ids[1]}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["error"] and canceled["queue_position"] == 0
    assert client.get(f"/v1/jobs/{ids[4]}").json()["queue_position"] == 4
    page = client.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:3]
    rest = client.get("/v1/jobs", params={"limit": 3, "before": page["next_before"]}).json()
    assert [j["job_id"] for j in rest["jobs"]] == ids[::-1][3:]


def test_health_stats_models_and_openapi(client, api):
    api.services.store.register_worker("gpu-1", host="h", capacity=2, models=["acestep-v15-turbo"], state="READY")
    health = client.get("/health").json()["data"]
    assert health["status"] == "ok" and health["live_workers"] == 1 and health["models_loaded"] == ["acestep-v15-turbo"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["acestep/acestep-v15-turbo"]
    # a worker that died without deregistering (no heartbeat for an hour) no longer counts
    long_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    api.services.store.register_worker("gpu-2", host="h", capacity=1, models=["acestep-v15-base"], state="READY", now=long_ago)
    health = client.get("/health").json()["data"]
    assert health["models_loaded"] == ["acestep-v15-turbo"] and health["live_workers"] == 1
    assert {w["id"]: w["alive"] for w in health["workers"]} == {"gpu-1": True, "gpu-2": False}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["acestep/acestep-v15-turbo"]
    client.post("/v1/music/generate", json={})
    stats = client.get("/v1/stats").json()["data"]
    assert stats["queue_size"] == 1 and stats["jobs"]["queued"] == 1 and stats["jobs"]["total"] == 1
    schema = client.get("/openapi.json").json()
    assert {"/v1/music/generate", "/v1/jobs/{job_id}", "/v1/jobs", "/health", "/v1/stats"} <= set(schema["paths"])
    assert "bpm" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert client.get("/docs").status_code == 200


def test_oversized_bodies_are_refused(client, engine):
    huge = b'{"caption": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = client.post("/v1/music/generate", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert job_rows(engine) == 0


def test_with_s3_storage_uploads_and_results_go_to_the_bucket(tmp_path, db_url, s3_endpoint, s3_bucket):
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port(),
                        storage_url=f"s3://{s3_bucket}/acestep", s3_endpoint_url=s3_endpoint)
    api = start_api(settings, db_url)
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            response = client.post("/v1/music/generate", data={"caption": "remix this song", "task_type": "repaint"},
                                   files={"src_audio": ("song.mp3", audio_bytes("mp3"), "audio/mpeg")})
            assert response.status_code == 200, response.text
            job_id = response.json()["job_id"]
            assert api.services.storage.open(f"jobs/{job_id}/input-src.mp3").read() == audio_bytes("mp3")
            with FakeWorker(api.services.store, api.services.storage):
                done = poll(client, job_id)
            url = done["result"]["first_audio_path"]
            assert url.startswith(f"{s3_endpoint}/{s3_bucket}/acestep/jobs/{job_id}/") and "X-Amz-Signature=" in url
            assert_downloads_audio(url)
            reuse = client.post("/v1/music/generate", json={"task_type": "cover",
                                "src_audio_path": f"s3://{s3_bucket}/acestep/jobs/{job_id}/output-0.mp3"})
            assert reuse.status_code == 200, reuse.text
            elsewhere = client.post("/v1/music/generate", json={"task_type": "cover",
                                    "src_audio_path": f"s3://{s3_bucket}/other/jobs/{job_id}/output-0.mp3"})
            assert elsewhere.status_code == 400
    finally:
        api.stop()


def test_lm_model_path_must_name_a_loaded_lm(client, api):
    accepted_without_workers = client.post("/v1/music/generate", json={"lm_model_path": "acestep-5Hz-lm-4B"})
    assert accepted_without_workers.status_code == 200  # nothing registered to check against
    api.services.store.register_worker("gpu-1", host="h", capacity=1, state="READY",
                                       models=["acestep-v15-turbo", "acestep-5Hz-lm-1.7B"])
    refused = client.post("/v1/music/generate", json={"lm_model_path": "acestep-5Hz-lm-4B"})
    assert refused.status_code == 422
    assert refused.json()["detail"] == [{"field": "lm_model_path",
                                         "message": "unknown 5 Hz LM 'acestep-5Hz-lm-4B'; the workers have loaded: acestep-5Hz-lm-1.7B"}]
    assert client.post("/v1/music/generate", json={"lm_model_path": "acestep-5Hz-lm-1.7B"}).status_code == 200


def test_a_job_claimed_before_the_submit_answers_says_running_at_position_zero(api):
    """A worker can claim the job between its insert and the submit's answer: the answer then says
    running with position 0, never queued at position 0."""
    store = api.services.store
    insert = store.submit

    def submit_then_claim(*args, **kwargs):
        submitted = insert(*args, **kwargs)
        assert [job.id for job in store.claim("quick-worker", 1)] == [submitted.id]
        return submitted

    store.submit = submit_then_claim
    try:
        answer = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "x"}, timeout=30).json()
    finally:
        store.submit = insert
    assert (answer["status"], answer["queue_position"]) == ("running", 0)
    queued = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "y"}, timeout=30).json()
    assert queued["status"] == "queued" and queued["queue_position"] >= 1
