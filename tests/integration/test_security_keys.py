"""API keys: a revoke command; a revoked key is refused within seconds; invalid keys fill no cache."""


import pytest
from fastapi.testclient import TestClient

from handler.cli import main
from handler.http.app import create_app
from handler.http.auth import Authenticator, create_api_key
from handler.http.services import build_services
from handler.settings import Settings


def test_revoke_key_refuses_the_key_within_the_cache_time(tmp_path, db_url, monkeypatch, capsys):
    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data", require_keys=True), db_url)
    key_id, key = create_api_key(svc.store, "alice")
    clock = [1000.0]
    monkeypatch.setattr("handler.http.auth.time.monotonic", lambda: clock[0])
    client = TestClient(create_app(svc))
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    monkeypatch.setenv("ACESTEP_DATABASE_URL", db_url)
    monkeypatch.setenv("ACESTEP_DATA_DIR", str(tmp_path / "data"))
    assert main(["revoke-key", key_id]) == 0 and f"revoked {key_id}" in capsys.readouterr().out
    clock[0] += Authenticator.CACHE_SECONDS + 0.1
    refused = client.get("/v1/jobs", headers=headers)
    assert refused.status_code == 401 and "invalid API key" in refused.text
    assert main(["revoke-key", "no-such-key"]) == 1


def test_invalid_keys_are_not_remembered(store):
    auth = Authenticator(store, open_mode=False, default_max_queued=10)
    for i in range(200):
        with pytest.raises(Exception, match="invalid API key"):
            auth.caller(f"Bearer not-a-key-{i}")
    assert len(auth._cache) == 0
    _, key = create_api_key(store, "bob")
    assert auth.caller(f"Bearer {key}").owner and len(auth._cache) == 1  # a valid key is


def test_health_hides_worker_ids_from_callers_without_a_key_and_stats_count_only_the_callers_jobs(tmp_path, db_url):
    from db import NewJob, WorkerState

    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data", require_keys=True), db_url)
    svc.store.register_worker("gpu-host-7", host="gpu-host-7", capacity=1, models=["m"], state=WorkerState.READY)
    _, alice = create_api_key(svc.store, "alice")
    bob_id, _ = create_api_key(svc.store, "bob")
    for _ in range(3):
        svc.store.submit(NewJob(request={}), owner=bob_id)
    client = TestClient(create_app(svc))
    anonymous = client.get("/health").json()["data"]
    assert "gpu-host-7" not in str(anonymous) and anonymous["workers"][0]["state"] == "READY"
    with_key = client.get("/health", headers={"Authorization": f"Bearer {alice}"}).json()["data"]
    assert with_key["workers"][0]["id"] == "gpu-host-7"
    stats = client.get("/v1/stats", headers={"Authorization": f"Bearer {alice}"}).json()["data"]
    assert stats["jobs"]["total"] == 0 and stats["jobs"]["queued"] == 0  # bob's jobs are not alice's business
