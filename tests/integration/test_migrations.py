"""Alembic's revisions produce exactly the models, and run down and up again."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from db import make_engine
from db.models import Base
from migrations import downgrade, upgrade


def schema_diff(url: str) -> list:
    engine = make_engine(url, pool_size=1)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    return diff, tables


def test_upgrade_matches_models_and_round_trips(empty_db_url):
    upgrade(empty_db_url)
    diff, tables = schema_diff(empty_db_url)
    assert diff == []
    assert {"jobs", "workers"} <= tables

    downgrade(empty_db_url, "base")
    diff, tables = schema_diff(empty_db_url)
    assert tables <= {"alembic_version"}
    assert diff  # with no tables the models differ: the comparison can fail

    upgrade(empty_db_url)
    diff, _ = schema_diff(empty_db_url)
    assert diff == []


def test_migrate_command_upgrades_the_configured_database(empty_db_url):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACESTEP_DATABASE_URL": empty_db_url}
    done = subprocess.run(
        [sys.executable, "-m", "handler.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "database at revision head" in done.stdout
    diff, tables = schema_diff(empty_db_url)
    assert diff == [] and {"jobs", "workers"} <= tables
