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
