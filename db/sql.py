"""Loads the named statements of `queries.sql` (`-- name: X` starts statement X)."""

import re
from functools import cache
from importlib.resources import files

from sqlalchemy import TextClause, text
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse_queries(source: str) -> dict[str, str]:
    """Split a SQL file into {name: statement}; a name may appear once."""
    parts = _NAME.split(source)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        # Leading comment lines document the statement; they are not sent to the server.
        lines = body.strip().splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        statement = "\n".join(lines).strip().rstrip(";").strip()
        if not statement:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = statement
    return queries


@cache
def queries() -> dict[str, TextClause]:
    """The project's statements, compiled once."""
    source = files("db").joinpath("queries.sql").read_text(encoding="utf-8")
    return {name: text(statement) for name, statement in parse_queries(source).items()}


@cache
def statements() -> dict[str, str]:
    """The same statements in psycopg's own placeholder style, for running on the driver directly."""
    dialect = PGDialect_psycopg()
    return {name: str(clause.compile(dialect=dialect)) for name, clause in queries().items()}
