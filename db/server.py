"""Finding a Postgres to talk to: the configured one, the local one, or an embedded pgserver."""

import logging
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(url: str, timeout: float = 2.0) -> bool:
    """True if a connection to `url` can be opened now."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) a pgserver instance in `data_dir`; returns its URL. It stops when the last user exits."""
    import pgserver  # imported lazily: starting it is the slow, optional path

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    log.info("embedded postgres running", extra={"action": "embedded_postgres", "data_dir": str(data_dir)})
    return server.get_uri()


def find_server(configured: str | None, data_dir: Path) -> str:
    """For tests and benchmarks: the given URL, else the local server on 127.0.0.1:5432, else an
    embedded one in `data_dir`. (`dev` never borrows the machine's server: it uses its own.)"""
    if configured:
        return configured
    if reachable(LOCAL_URL):
        return LOCAL_URL
    return start_embedded(data_dir)
