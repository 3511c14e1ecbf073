"""Test databases, for the tiers that talk to Postgres (integration, acceptance: their conftests import
these fixtures): a server (ACESTEP_TEST_DATABASE_URL, else 127.0.0.1:5432, else embedded pgserver),
a migrated template database per test session, and a fresh clone of it per test."""

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from db import JobStore, make_engine
from db.server import find_server
from migrations import upgrade


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _admin(server_url: str, *statements: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One data folder per session, not per tier: both tiers' conftests hold this fixture, and in one
    # run they share the embedded server (pgserver reuses the instance running in a folder).
    return find_server(os.environ.get("ACESTEP_TEST_DATABASE_URL"), tmp_path_factory.getbasetemp() / "pgserver")


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    name = f"acestep_tpl_{uuid.uuid4().hex[:12]}"
    _admin(pg_server_url, f'CREATE DATABASE "{name}"')
    upgrade(database_url(pg_server_url, name))
    yield name
    _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """A brand-new database with no schema."""
    name = f"acestep_t_{uuid.uuid4().hex[:12]}"
    _admin(pg_server_url, f'CREATE DATABASE "{name}"')
    yield database_url(pg_server_url, name)
    _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_server_url: str, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own, cloned from the session's template."""
    name = f"acestep_t_{uuid.uuid4().hex[:12]}"
    _admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield database_url(pg_server_url, name)
    _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str):
    engine = make_engine(db_url, pool_size=4, application_name="acestep-tests")
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine) -> JobStore:
    return JobStore(engine, lease_seconds=30)
