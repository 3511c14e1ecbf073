"""Many workers and submitters at once, on separate connections and processes."""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import text

from db import IdempotencyConflict, JobStore, NewJob, make_engine

WORKER_SCRIPT = Path(__file__).with_name("claim_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def test_eight_processes_complete_every_job_exactly_once(db_url, store, engine):
    store.submit_many([NewJob(request={"n": i}, priority=i % 4) for i in range(2000)])
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE completions (job_id uuid NOT NULL, worker text NOT NULL)"))

    workers = [
        subprocess.Popen([sys.executable, str(WORKER_SCRIPT), db_url, f"w{i}"], cwd=ROOT) for i in range(8)
    ]
    assert [w.wait(timeout=240) for w in workers] == [0] * 8

    with engine.connect() as conn:
        by_status = dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        assert by_status == {"succeeded": 2000}
        assert conn.execute(text("SELECT count(*) FROM jobs WHERE attempt <> 1")).scalar() == 0
        assert conn.execute(text("SELECT count(*), count(DISTINCT job_id) FROM completions")).one() == (2000, 2000)
        # The result on each row was written by the worker that recorded the completion.
        mismatched = conn.execute(
            text("SELECT count(*) FROM jobs JOIN completions c ON c.job_id = jobs.id WHERE result->>'worker' <> c.worker")
        ).scalar()
        assert mismatched == 0
        assert conn.execute(text("SELECT count(DISTINCT worker) FROM completions")).scalar() > 1


def test_concurrent_submits_with_one_idempotency_key_create_one_job(db_url):
    engine = make_engine(db_url, pool_size=24)
    store = JobStore(engine)
    barrier = threading.Barrier(24)

    def submit(_: int):
        barrier.wait()
        return store.submit(NewJob(request={"caption": "upbeat pop song"}), owner="key-a", idempotency_key="abc")

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(submit, range(24)))

    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1

    # The same key with another body is a conflict; another owner's key is its own.
    try:
        store.submit(NewJob(request={"caption": "something else"}), owner="key-a", idempotency_key="abc")
    except IdempotencyConflict:
        pass
    else:
        raise AssertionError("a different body under the same key must conflict")
    other = store.submit(NewJob(request={"caption": "upbeat pop song"}), owner="key-b", idempotency_key="abc")
    assert other.created and other.id != results[0].id
    engine.dispose()


def test_queue_position_under_concurrent_claims(db_url, store):
    ids = store.submit_many([NewJob(request={"n": i}, priority=(i * 7) % 3) for i in range(300)])
    engine = make_engine(db_url, pool_size=6)
    claimers = JobStore(engine)
    barrier = threading.Barrier(6)

    def claim(i: int):
        barrier.wait()
        return [j.id for j in claimers.claim(f"w{i}", 10 + i)]

    with ThreadPoolExecutor(6) as pool:
        claimed = [job_id for batch in pool.map(claim, range(6)) for job_id in batch]
    engine.dispose()

    assert len(claimed) == len(set(claimed)) == sum(10 + i for i in range(6))
    remaining = [store.get(i) for i in ids if i not in set(claimed)]
    remaining.sort(key=lambda row: (row["priority"], row["created_at"], row["id"]))
    assert [store.queue_position(row["id"]) for row in remaining] == list(range(1, len(remaining) + 1))
    assert {store.queue_position(i) for i in claimed} == {0}
    # Claim order is priority order: nothing claimed may rank behind something left in the queue.
    worst_claimed = max((store.get(i)["priority"] for i in claimed))
    assert worst_claimed <= remaining[0]["priority"]
