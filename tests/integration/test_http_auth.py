"""API keys over HTTP: each key sees only its own jobs and files; a per-key cap on queued jobs."""

import httpx
import pytest

from handler.http.auth import create_api_key
from handler.settings import Settings
from tests.integration.http_harness import free_port, run_fake_jobs, start_api


@pytest.fixture
def api(tmp_path, db_url):
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), require_keys=True)
    live = start_api(settings, db_url)
    yield live
    live.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_and_scope_jobs_and_files(api):
    store, storage = api.services.store, api.services.storage
    _, alice = create_api_key(store, "alice")
    _, bob = create_api_key(store, "bob")
    with httpx.Client(base_url=api.url, timeout=30) as client:
        assert client.get("/health").status_code == 200  # open, for load balancers
        for method, path in [("POST", "/v1/music/generate"), ("GET", "/v1/jobs"), ("GET", "/v1/stats"),
                             ("GET", "/v1/models"), ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000")]:
            assert client.request(method, path, json={}).status_code == 401, path
            assert client.request(method, path, json={}, headers=bearer("ace_wrong")).status_code == 401, path
            assert client.request(method, path, json={}, headers={"Authorization": alice}).status_code == 401, path

        job_id = client.post("/v1/music/generate", json={"caption": "mine"}, headers=bearer(alice)).json()["job_id"]
        run_fake_jobs(store, storage)
        mine = client.get(f"/v1/jobs/{job_id}", headers=bearer(alice)).json()
        assert mine["status"] == "succeeded"

        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(bob)).status_code == 404
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(bob)).status_code == 404
        assert client.get("/v1/jobs", headers=bearer(bob)).json()["jobs"] == []
        assert [j["job_id"] for j in client.get("/v1/jobs", headers=bearer(alice)).json()["jobs"]] == [job_id]
        stolen = client.post("/v1/music/generate", headers=bearer(bob),
                             json={"task_type": "cover", "src_audio_path": f"jobs/{job_id}/output-0.mp3"})
        assert stolen.status_code == 400

        url = mine["result"]["first_audio_path"]
        assert httpx.get(url).status_code == 200
        path, query = url.split("?")
        assert httpx.get(path).status_code == 422  # no signature at all
        forged_sig = query.replace("signature=", "signature=0")
        assert httpx.get(f"{path}?{forged_sig}").status_code == 403
        other_file = path.replace("output-0", "output-1")
        assert httpx.get(f"{other_file}?{query}").status_code == 403  # a signature is for one file
        expired = query.split("&")
        expired = "&".join("expires=1" if p.startswith("expires=") else p for p in expired)
        assert httpx.get(f"{path}?{expired}").status_code == 403


def test_queued_jobs_per_key_are_capped_with_retry_after(api):
    store = api.services.store
    _, small = create_api_key(store, "small", max_queued=2)
    _, other = create_api_key(store, "other")
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for _ in range(2):
            assert client.post("/v1/music/generate", json={}, headers=bearer(small)).status_code == 200
        refused = client.post("/v1/music/generate", json={}, headers=bearer(small))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert client.post("/v1/music/generate", json={}, headers=bearer(other)).status_code == 200
        run_fake_jobs(store, api.services.storage)  # the queue drains: room again
        assert client.post("/v1/music/generate", json={}, headers=bearer(small)).status_code == 200
    assert store.stats()["counts"] == {"succeeded": 3, "queued": 1}
