"""With 100 000 queued jobs the hot queries use their indexes, never a sequential scan of jobs."""

import json

import pytest
from sqlalchemy import text

from db.sql import queries
from handler.http.cost_model import PRIORS


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def explain(conn, name: str, params: dict) -> list[dict]:
    statement = text("EXPLAIN (FORMAT JSON) " + queries()[name].text)
    raw = conn.execute(statement, params).scalar()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return list(plan_nodes(plan[0]["Plan"]))


@pytest.fixture
def big_queue(engine):
    with engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (priority, request, model, audio_seconds, created_at) "
                "SELECT g % 5, '{}'::jsonb, 'turbo', 30, now() + g * interval '1 ms' "
                "FROM generate_series(1, 100000) AS g"
            )
        )
        conn.execute(text("INSERT INTO jobs (status, finished_at) SELECT 'succeeded', now() FROM generate_series(1, 20000)"))
        conn.execute(text("VACUUM ANALYZE jobs"))
        middle = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority, created_at OFFSET 50000 LIMIT 1")).scalar()
    return middle


COSTS = PRIORS["gpu"].sql_array()


ANY_MODEL = {"dits": None, "lms": None}  # a claimer that declares no models
ROUTED = {"dits": ["turbo", "acestep-v15-base"], "lms": ["acestep-5Hz-lm-1.7B"]}  # a worker's served lists


@pytest.mark.parametrize(
    "name,params",
    [
        ("claim_jobs", {"limit": 100, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": None,
                        "lookahead": None, "job_id": None, **ANY_MODEL}),
        ("claim_jobs", {"limit": 7, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": "k",
                        "lookahead": 200, "job_id": None, **ANY_MODEL}),
        ("claim_jobs", {"limit": 100, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": None,
                        "lookahead": None, "job_id": None, **ROUTED}),
        ("claim_jobs", {"limit": 7, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": "k",
                        "lookahead": 200, "job_id": None, **ROUTED}),
        ("queue_position", {"id": "MIDDLE", "models": None}),
        ("queue_position", {"id": "MIDDLE", "models": ["turbo", ""]}),
        ("queue_front", {"id": "MIDDLE", "limit": 64, "models": None}),
        ("queue_front", {"id": "MIDDLE", "limit": 64, "models": ["turbo", ""]}),
        ("queue_ahead_total", {"id": "MIDDLE", "costs": "{}", "default_costs": COSTS, "models": None}),
        ("queue_ahead_total", {"id": "MIDDLE", "costs": "{}", "default_costs": COSTS, "models": ["turbo", ""]}),
    ],
)
def test_hot_queries_use_the_queue_index(engine, big_queue, name, params):
    params = {k: (big_queue if v == "MIDDLE" else v) for k, v in params.items()}
    with engine.connect() as conn:
        nodes = explain(conn, name, params)
    seq_scans = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"]
    assert seq_scans == []
    assert "ix_jobs_queue" in {n.get("Index Name") for n in nodes}


def test_claiming_one_named_job_reads_only_that_row(engine, big_queue):
    params = {"limit": 1, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": None,
              "lookahead": None, "job_id": big_queue, **ROUTED}
    with engine.connect() as conn:
        nodes = explain(conn, "claim_jobs", params)
    assert [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"] == []
    assert "pk_jobs" in {n.get("Index Name") for n in nodes}


def test_queue_position_of_a_job_deep_in_the_queue(store, big_queue):
    assert store.queue_position(big_queue) == 50001


def test_the_workers_hot_statements_use_their_indexes_right_after_a_burst(engine, db_url):
    """100 000 jobs into a table never analysed: on a worker's connection (db/engine.py INDEX_PLANS)
    claim and complete still plan on their indexes, not a sort of a bitmap scan or a table scan."""
    from db import JobStore, make_engine

    with engine.connect() as conn:
        conn.execute(text("INSERT INTO jobs (priority, request, model, created_at) SELECT g % 5, '{}'::jsonb, 'turbo', "
                          "now() + g * interval '1 ms' FROM generate_series(1, 100000) AS g"))
    worker_engine = make_engine(db_url, pool_size=1, index_plans=True)
    try:
        claimed = JobStore(worker_engine).claim("w", 100, dits=ROUTED["dits"], lms=ROUTED["lms"])
        done = json.dumps([{"id": str(j.id), "attempt": j.attempt, "result": {}, "timings": None} for j in claimed])
        plans = {"claim_jobs": {"limit": 100, "worker_id": "w", "lease_seconds": 60.0, "now": None, "batch_key": None,
                                "lookahead": None, "job_id": None, **ROUTED},
                 "complete_jobs": {"done": done, "worker_id": "w", "now": None}}
        for name, params in plans.items():
            with worker_engine.connect() as conn:
                nodes = explain(conn, name, params)
            scans = {n["Node Type"] for n in nodes if n.get("Relation Name") == "jobs"} - {"ModifyTable"}
            assert scans <= {"Index Scan", "Index Only Scan"}, (name, scans)
    finally:
        worker_engine.dispose()
    assert len(claimed) == 100
