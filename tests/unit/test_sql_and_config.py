"""Pure logic: the SQL loader, URLs, settings, error translation. No services needed."""

import re
from pathlib import Path

import pytest

from db import DatabaseUnavailable, JobStore, make_engine
from db.engine import sqlalchemy_url
from db.sql import parse_queries, queries
from db.store import request_hash
from handler.cli import build_parser
from handler.settings import Settings

STORE_SOURCE = (Path(__file__).resolve().parents[2] / "db" / "store.py").read_text()


def test_parse_queries_splits_named_statements_and_drops_their_comments():
    parsed = parse_queries("-- name: a\n-- why a exists\nSELECT 1;\n\n-- name: b\nSELECT :x\n")
    assert parsed == {"a": "SELECT 1", "b": "SELECT :x"}


@pytest.mark.parametrize("source", ["-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;", "-- name: a\n-- only a comment\n"])
def test_parse_queries_rejects_duplicates_and_empty_statements(source):
    with pytest.raises(ValueError):
        parse_queries(source)


def test_every_statement_the_store_runs_exists_and_every_statement_is_used():
    used = set(re.findall(r'self\._(?:run|fenced)\(\s*"(\w+)"', STORE_SOURCE))
    assert used == set(queries())


def test_every_write_to_a_running_job_is_fenced():
    fence = re.compile(r"status = 'running' AND \w+\.attempt = (:attempt|done\.attempt) AND \w+\.worker_id = :worker_id")
    for name in ["heartbeat_job", "complete_jobs", "fail_job", "release_job", "finish_canceled"]:
        assert fence.search(queries()[name].text), name


def test_request_hash_ignores_key_order_but_not_values():
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 2})


def test_database_urls_select_psycopg_and_reject_other_databases():
    assert sqlalchemy_url("postgresql://u:p%40ss@h:5/db").startswith("postgresql+psycopg://u:p%40ss@h:5/db")
    assert sqlalchemy_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    with pytest.raises(ValueError, match="postgresql://"):
        sqlalchemy_url("mysql://h/db")


def test_unreachable_database_raises_the_stores_own_error():
    store = JobStore(make_engine("postgresql://nobody@127.0.0.1:1/none", pool_size=1))
    with pytest.raises(DatabaseUnavailable, match="database unavailable"):
        store.claim("w", 1)


def test_settings_read_acestep_variables_and_name_the_bad_one(monkeypatch):
    monkeypatch.setenv("ACESTEP_LEASE_SECONDS", "120")
    monkeypatch.setenv("ACESTEP_HEARTBEAT_SECONDS", "20")
    settings = Settings()
    assert (settings.lease_seconds, settings.heartbeat_seconds, settings.max_attempts) == (120, 20, 3)
    monkeypatch.setenv("ACESTEP_HEARTBEAT_SECONDS", "90")
    with pytest.raises(ValueError, match="ACESTEP_HEARTBEAT_SECONDS"):
        Settings()


def test_migrate_without_a_database_url_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("ACESTEP_DATABASE_URL", raising=False)
    args = build_parser().parse_args(["migrate"])
    with pytest.raises(SystemExit, match="ACESTEP_DATABASE_URL"):
        args.func(args)
