"""A throw-away database for one benchmark run, on the given server, else the local one, else embedded."""

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db.server import find_server  # noqa: E402
from migrations import upgrade  # noqa: E402


def bench_server(configured: str | None) -> str:
    return find_server(configured, Path(".acestep/bench-postgres"))


@contextmanager
def scratch_database(server_url: str, prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """Create `<prefix>_<random>` (migrated unless told not to), yield its URL, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        if migrate:
            upgrade(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
