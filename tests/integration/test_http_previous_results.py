"""`src_audio_path` / `reference_audio_path` naming a previous result of the same caller (by its
download URL, its /v1/audio link, its key), and refusals that say why."""

import io
from datetime import datetime, timezone
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from handler.http.app import create_app
from handler.http.audio_links import audio_link
from handler.http.auth import create_api_key
from handler.http.services import build_services
from handler.settings import Settings
from tests.integration.http_harness import audio_bytes


def make(tmp_path, db_url, **overrides):
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", **overrides)
    svc = build_services(settings, db_url)
    return svc, TestClient(create_app(svc))


def finished_job(svc, client, headers=None) -> tuple[str, str]:
    """A job of the caller that a worker finished as ours do (its file under attempt-1/); (its id, the key)."""
    job_id = client.post("/v1/music/generate", json={"caption": "first"}, headers=headers).json()["job_id"]
    [job] = svc.store.claim("w", 1)
    key = f"jobs/{job.id}/attempt-{job.attempt}/output-0.wav"
    svc.storage.put(key, io.BytesIO(audio_bytes()), "audio/wav")
    svc.store.complete(job, "w", {"audio_keys": [key], "generation_info": "", "status_message": "", "seed_value": "1"})
    return job_id, key


def cover(client, value: str, headers=None, field: str = "src_audio_path"):
    return client.post("/v1/music/generate", json={"task_type": "cover", field: value}, headers=headers)


def test_a_previous_result_is_a_source_by_url_link_or_key(tmp_path, db_url):
    svc, client = make(tmp_path, db_url)
    job_id, key = finished_job(svc, client)
    url = client.get(f"/v1/jobs/{job_id}").json()["result"]["first_audio_path"]
    relative = urlparse(url)
    expired_link = audio_link(svc, key, now=datetime.now(timezone.utc).timestamp() - 10 * svc.settings.url_expires_seconds)
    for value in (url, f"{relative.path}?{relative.query}", relative.path, key, audio_link(svc, key),
                  "http://testserver" + audio_link(svc, key), expired_link):
        accepted = cover(client, value)
        assert accepted.status_code == 200, (value, accepted.text)
        assert svc.store.get(accepted.json()["job_id"])["request"]["inputs"] == {"src": {"key": key}}, value
    as_reference = client.post("/v1/music/generate", json={"reference_audio_path": url})
    assert svc.store.get(as_reference.json()["job_id"])["request"]["inputs"] == {"ref": {"key": key}}


def test_another_callers_result_and_missing_files_are_refused_saying_why(tmp_path, db_url):
    svc, client = make(tmp_path, db_url, require_keys=True)
    alice = {"Authorization": f"Bearer {create_api_key(svc.store, 'alice')[1]}"}
    bob = {"Authorization": f"Bearer {create_api_key(svc.store, 'bob')[1]}"}
    job_id, key = finished_job(svc, client, alice)
    url = client.get(f"/v1/jobs/{job_id}", headers=alice).json()["result"]["first_audio_path"]
    for value in (url, key, audio_link(svc, key)):
        refused = cover(client, value, bob)
        assert refused.status_code == 400, value
        [problem] = refused.json()["detail"]
        assert problem["field"] == "src_audio_path" and "not one of your jobs" in problem["message"]
    missing = cover(client, key.replace("output-0", "output-5"), alice)
    assert missing.status_code == 400 and "has no file 'attempt-1/output-5.wav'" in missing.json()["detail"][0]["message"]
    forged = cover(client, "/v1/audio?path=bm90LWEta2V5.1.c2ln", alice)
    assert forged.status_code == 400 and "did not make" in forged.json()["detail"][0]["message"]


def test_without_an_input_root_server_paths_are_off_and_the_refusal_says_so(tmp_path, db_url):
    _, client = make(tmp_path, db_url)
    song = tmp_path / "song.wav"
    song.write_bytes(audio_bytes())
    refused = cover(client, str(song))
    assert refused.status_code == 400
    message = refused.json()["detail"][0]["message"]
    assert "server paths are off: ACESTEP_INPUT_ROOT is not set" in message and "src_audio" in message
    assert str(tmp_path) not in message


@pytest.mark.parametrize("value,why", [("/etc/passwd", "outside the server's input directory"),
                                       ("{root}/missing.wav", "names no file"),
                                       ("https://elsewhere.example/song.mp3", "not a download link of this server")])
def test_other_refusals_say_why(tmp_path, db_url, value, why):
    (tmp_path / "inputs").mkdir()
    _, client = make(tmp_path, db_url, input_root=tmp_path / "inputs")
    refused = cover(client, value.format(root=tmp_path / "inputs"))
    assert refused.status_code == 400 and why in refused.json()["detail"][0]["message"]
