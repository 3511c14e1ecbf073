"""Engine factory: one place that turns a Postgres URL into a SQLAlchemy engine on psycopg 3."""

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url


def sqlalchemy_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (what operators and PaaS hand out) and select psycopg 3."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"ACESTEP_DATABASE_URL must be a postgresql:// URL, got backend {parsed.get_backend_name()!r}")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


# A worker's statements (claim, heartbeat, complete, fail, release, rescue, prune) all have an index
# made for them. Planned with these settings they use it whatever the table's statistics say: right
# after a burst into a table not yet analysed, the planner would otherwise sort a bitmap scan of every
# queued job to claim 100 (69 ms instead of 2) or scan the table to complete them. Set per connection,
# so they cost no round trip.
INDEX_PLANS = "-c enable_bitmapscan=off -c enable_seqscan=off -c enable_hashjoin=off"


def make_engine(url: str, *, pool_size: int = 5, application_name: str = "acestep-serverless",
                index_plans: bool = False) -> Engine:
    """An engine whose connections run every statement in its own transaction.

    Each queue operation is a single statement, so autocommit saves the BEGIN/COMMIT round trips
    without changing what the statements mean. There is no pre-ping (it would double the round
    trips of every call): a connection that died with its server fails one call with
    DatabaseUnavailable, the pool drops every stale connection, and the next call reconnects.
    `index_plans`: the worker's engine (see INDEX_PLANS).
    """
    connect_args = {"application_name": application_name} | ({"options": INDEX_PLANS} if index_plans else {})
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        isolation_level="AUTOCOMMIT",
        connect_args=connect_args,
    )
