"""Test databases: a server (ACESTEP_TEST_DATABASE_URL, else 127.0.0.1:5432, else embedded pgserver),
a migrated template database per test session, and a fresh clone of it per test."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer
from sqlalchemy.engine import make_url

from db import JobStore, make_engine
from db.server import find_server
from migrations import upgrade
from tests.integration.http_harness import free_port


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _admin(server_url: str, *statements: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return find_server(os.environ.get("ACESTEP_TEST_DATABASE_URL"), Path(tmp_path_factory.mktemp("pgserver")))


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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol endpoint (moto's server) on 127.0.0.1, with test credentials in the env."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4")).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def tiny_pt_lm(tmp_path_factory):
    """The tiny random 5 Hz LM on the pt backend (CPU, float32), built once per session."""
    import torch

    from pipeline.lm.pt_backend import PtBackend
    from pipeline.tiny_text import build_tiny_lm

    path = build_tiny_lm(tmp_path_factory.mktemp("lm") / "acestep-5Hz-lm-0.6B")
    return PtBackend.load(path, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """Tiny random checkpoints in the real layout, built once per test session (no 5 Hz LM)."""
    from pipeline.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"), with_lm=False)
