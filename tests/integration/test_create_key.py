"""`create-key` prints a webhook secret the server will sign with, or refuses (issue 14): it never
makes up a server secret of its own."""

import re

import pytest

from db import JobStore, make_engine
from handler.backends import secret_key
from handler.cli import main
from handler.http.services import build_services
from handler.settings import Settings
from handler.webhooks import owner_webhook_secret


@pytest.fixture
def cli_env(monkeypatch, tmp_path, db_url):
    monkeypatch.delenv("ACESTEP_SECRET_KEY", raising=False)
    monkeypatch.setenv("ACESTEP_DATABASE_URL", db_url)
    monkeypatch.setenv("ACESTEP_DATA_DIR", str(tmp_path / "server-data"))
    return tmp_path / "server-data"


def printed_key(out: str) -> tuple[str, str]:
    key_id = re.search(r"key id:\s+(\S+)", out).group(1)
    return key_id, re.search(r"webhook secret:\s+(\S+)", out).group(1)


def keys_in(db_url: str) -> int:
    return JobStore(make_engine(db_url, pool_size=1)).active_api_keys()


def test_without_the_servers_secret_it_refuses_and_creates_nothing(cli_env, db_url, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["create-key", "alice"])
    message = str(refused.value)
    assert "ACESTEP_SECRET_KEY is not set" in message and "ACESTEP_DATA_DIR" in message
    assert not (cli_env / "secret-key").exists() and keys_in(db_url) == 0
    assert "webhook secret" not in capsys.readouterr().out


def test_with_the_servers_data_dir_the_secret_is_the_servers(cli_env, db_url, capsys):
    server = Settings(database_url=db_url, data_dir=cli_env)
    build_services(server, db_url)  # the server starts: it keeps its secret in its data dir
    assert main(["create-key", "alice"]) == 0
    key_id, webhook_secret = printed_key(capsys.readouterr().out)
    assert webhook_secret == owner_webhook_secret(secret_key(server), key_id) and keys_in(db_url) == 1


def test_with_the_servers_secret_key_setting(cli_env, db_url, monkeypatch, capsys):
    monkeypatch.setenv("ACESTEP_SECRET_KEY", "the production secret")
    assert main(["create-key", "alice"]) == 0
    key_id, webhook_secret = printed_key(capsys.readouterr().out)
    assert webhook_secret == owner_webhook_secret(b"the production secret", key_id)
    assert not (cli_env / "secret-key").exists()


def test_without_a_database_it_says_which(cli_env, monkeypatch):
    monkeypatch.delenv("ACESTEP_DATABASE_URL")
    monkeypatch.setenv("ACESTEP_SECRET_KEY", "s")
    with pytest.raises(SystemExit, match="ACESTEP_DATABASE_URL is not set and .* holds no `dev` database"):
        main(["create-key", "alice"])
