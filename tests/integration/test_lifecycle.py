"""Job lifecycle on a real Postgres, with time moved by the injected `now`."""

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from sqlalchemy import text

from db import JobLost, JobNotFound, JobStatus, NewJob
from db.store import RESCUE_LOCK_KEY

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submit_one(store, **kwargs):
    return store.submit(NewJob(request={"caption": "x"}, **kwargs), now=at(0)).id


def test_stale_writer_changes_nothing_and_learns_it_lost(store):
    job_id = submit_one(store)
    first = store.claim("worker-a", 1, now=at(1))[0]
    assert store.heartbeat(first, "worker-a", stage="dit", progress=0.25, now=at(10)) is False

    # Lease (30 s) runs out at 40 s; the rescuer puts the job back, another worker takes attempt 2.
    assert store.rescue_expired(now=at(41)) == [(job_id, "queued")]
    second = store.claim("worker-b", 1, now=at(60))[0]
    assert (second.id, second.attempt) == (job_id, 2)
    store.heartbeat(second, "worker-b", stage="vae", progress=0.75, now=at(61))

    with pytest.raises(JobLost):
        store.heartbeat(first, "worker-a", stage="dit", progress=0.5, now=at(62))
    with pytest.raises(JobLost):
        store.complete(first, "worker-a", {"audio_paths": ["stale"]}, now=at(63))
    assert store.complete_many([(first, {"audio_paths": ["stale"]})], "worker-a", now=at(63)) == set()
    with pytest.raises(JobLost):
        store.fail(first, "worker-a", "late failure", retryable=False, now=at(64))
    with pytest.raises(JobLost):
        store.release(first, "worker-a", refund=True, now=at(64))

    row = store.get(job_id)
    assert (row["status"], row["attempt"], row["worker_id"]) == ("running", 2, "worker-b")
    assert (row["stage"], row["progress"], row["result"]) == ("vae", 0.75, None)

    store.complete(second, "worker-b", {"audio_paths": ["fresh"]}, now=at(70))
    row = store.get(job_id)
    assert (row["status"], row["result"]) == ("succeeded", {"audio_paths": ["fresh"]})


def test_claim_batch_takes_jobs_of_the_batch_key_among_the_next_in_line(store):
    keys = ["a", "b", "a", None, "a", "a"]
    ids = [store.submit(NewJob(request={"batch_key": k} if k else {}), now=at(i)).id for i, k in enumerate(keys)]
    head = store.claim("w", 1, now=at(10))[0]
    assert head.id == ids[0]

    # Of the next four in line (ids 1-4) only 2 and 4 have key "a"; 5 is beyond the lookahead.
    mates = store.claim_batch("w", "a", 5, lookahead=4, now=at(11))
    assert [(j.id, j.attempt) for j in mates] == [(ids[2], 1), (ids[4], 1)]
    assert store.claim_batch("w", "a", 0, now=at(11)) == []
    assert store.claim_batch("w", "c", 5, now=at(11)) == []
    assert {store.get(i)["status"] for i in (ids[2], ids[4])} == {JobStatus.RUNNING}

    # A plain claim takes whatever is next, batch key or not.
    assert [j.id for j in store.claim("w", 5, now=at(12))] == [ids[1], ids[3], ids[5]]


def test_attempt_fences_a_stale_handle_of_the_same_worker(store):
    submit_one(store)
    first = store.claim("worker-a", 1, now=at(1))[0]
    store.rescue_expired(now=at(100))
    again = store.claim("worker-a", 1, now=at(200))[0]
    assert again.attempt == 2
    with pytest.raises(JobLost):
        store.complete(first, "worker-a", {"stale": True}, now=at(201))
    assert store.get(first.id)["status"] == "running"


def test_rescue_requeues_then_fails_when_attempts_are_exhausted(store):
    job_id = store.submit(NewJob(request={"caption": "x"}), max_attempts=2, now=at(0)).id
    store.claim("w", 1, now=at(1))
    assert store.rescue_expired(now=at(20)) == []  # lease still valid
    assert store.rescue_expired(now=at(32)) == [(job_id, "queued")]
    row = store.get(job_id)
    assert (row["status"], row["attempt"], row["worker_id"], row["error"]) == ("queued", 1, None, None)
    assert len(row["errors"]) == 1 and row["errors"][0]["attempt"] == 1

    assert store.claim("w", 1, now=at(33)) == []  # backoff: 5 s after the rescue
    second = store.claim("w", 1, now=at(38))[0]
    assert second.attempt == 2
    assert store.rescue_expired(now=at(100)) == [(job_id, "failed")]
    row = store.get(job_id)
    assert row["status"] == "failed" and row["finished_at"] == at(100)
    assert "stopped responding" in row["error"] and "attempt 2 of 2" in row["error"]
    assert "no attempts are left" in row["error"]
    assert [e["attempt"] for e in row["errors"]] == [1, 2]


def test_rescuers_are_serialised_by_an_advisory_lock(store, db_url):
    job_id = submit_one(store)
    store.claim("w", 1, now=at(1))
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (RESCUE_LOCK_KEY,))
        assert store.rescue_expired(now=at(100)) == []
        other.execute("SELECT pg_advisory_unlock(%s)", (RESCUE_LOCK_KEY,))
    assert store.rescue_expired(now=at(100)) == [(job_id, "queued")]


def test_heartbeat_keeps_the_job_from_the_rescuer(store):
    job_id = submit_one(store)
    job = store.claim("w", 1, now=at(1))[0]
    store.heartbeat(job, "w", now=at(25))  # lease now ends at 55 s
    assert store.rescue_expired(now=at(45)) == []
    assert store.get(job_id)["status"] == "running"


def test_fail_retries_with_backoff_then_fails_for_good(store):
    job_id = submit_one(store)
    job = store.claim("w", 1, now=at(1))[0]
    assert store.fail(job, "w", "CUDA out of memory", retryable=True, now=at(2)) == "queued"
    assert store.claim("w", 1, now=at(6)) == []
    job = store.claim("w", 1, now=at(7))[0]
    assert job.attempt == 2
    assert store.fail(job, "w", "CUDA out of memory", retryable=True, now=at(8)) == "queued"
    assert store.claim("w", 1, now=at(17)) == []  # second backoff is 10 s
    job = store.claim("w", 1, now=at(18))[0]
    assert store.fail(job, "w", "still out of memory", retryable=True, now=at(19)) == "failed"
    row = store.get(job_id)
    assert (row["status"], row["error"], row["attempt"]) == ("failed", "still out of memory", 3)
    assert len(row["errors"]) == 3


def test_non_retryable_failure_is_final_at_once(store):
    job_id = submit_one(store)
    job = store.claim("w", 1, now=at(1))[0]
    assert store.fail(job, "w", "src_audio is not decodable audio", retryable=False, now=at(2)) == "failed"
    row = store.get(job_id)
    assert (row["status"], row["attempt"], row["finished_at"]) == ("failed", 1, at(2))


def test_release_refunds_the_attempt_only_on_soft_shutdown(store):
    job_id = submit_one(store)
    job = store.claim("w", 1, now=at(1))[0]
    assert store.release(job, "w", refund=True, now=at(2)) == "queued"
    row = store.get(job_id)
    assert (row["status"], row["attempt"], row["worker_id"]) == ("queued", 0, None)
    assert store.queue_position(job_id) == 1
    job = store.claim("w2", 1, now=at(3))[0]
    assert job.attempt == 1
    assert store.release(job, "w2", refund=False, now=at(4)) == "queued"
    assert store.get(job_id)["attempt"] == 1


def test_cancel(store):
    queued = submit_one(store)
    outcome = store.cancel(queued, now=at(1))
    assert (outcome.before, outcome.after) == ("queued", "canceled")
    assert store.claim("w", 5, now=at(2)) == []

    running_id = submit_one(store)
    job = store.claim("w", 1, now=at(2))[0]
    outcome = store.cancel(running_id, now=at(3))
    assert (outcome.before, outcome.after) == ("running", "running")
    assert store.heartbeat(job, "w", now=at(4)) is True
    store.finish_canceled(job, "w", now=at(5))
    assert store.get(running_id)["status"] == "canceled"

    outcome = store.cancel(running_id, now=at(6))
    assert (outcome.before, outcome.after) == ("canceled", None)
    with pytest.raises(JobNotFound):
        store.cancel("00000000-0000-0000-0000-000000000000")


def test_expired_job_with_a_cancel_request_ends_canceled(store):
    job_id = submit_one(store)
    store.claim("w", 1, now=at(1))
    store.cancel(job_id, now=at(2))
    assert store.rescue_expired(now=at(100)) == [(job_id, "canceled")]


def test_queue_position_follows_priority_then_age(store):
    priorities = [2, 0, 1, 0, 2, 1, 0]
    ids = [store.submit(NewJob(request={"i": i}, priority=p), now=at(i)).id for i, p in enumerate(priorities)]
    expected = sorted(range(len(ids)), key=lambda i: (priorities[i], i))
    assert [store.queue_position(ids[i]) for i in expected] == list(range(1, len(ids) + 1))
    urgent = store.submit(NewJob(request={"urgent": True}, priority=-1), now=at(100)).id
    assert store.queue_position(urgent) == 1
    assert store.queue_position(ids[expected[-1]]) == len(ids) + 1
    with pytest.raises(JobNotFound):
        store.queue_position("00000000-0000-0000-0000-000000000000")


def test_the_work_ahead_is_listed_and_priced_in_claim_order(store):
    for i, model in enumerate(["turbo", "base", "turbo", "turbo"]):
        store.submit(NewJob(request={}, model=model, items=i + 1, audio_seconds=10.0 * (i + 1)), now=at(i))
    mine = store.submit(NewJob(request={}, model="base", audio_seconds=None, lm_mode=2, dit_steps=50), now=at(10)).id
    store.submit(NewJob(request={}, model="turbo", audio_seconds=999.0), now=at(11))  # behind: not counted
    running = store.claim("w", 1, now=at(20))[0]
    store.heartbeat(running, "w", stage="dit", progress=0.5, now=at(21))

    running_now, ahead = store.queue_front(mine, 10)
    assert [(r["model"], r["items"], r["audio_seconds"]) for r in ahead] == [
        ("base", 2, 20.0), ("turbo", 3, 30.0), ("turbo", 4, 40.0), ("base", 1, None)]
    assert (ahead[-1]["id"], ahead[-1]["lm_mode"], ahead[-1]["dit_steps"]) == (mine, 2, 50)
    assert len(store.queue_front(mine, 2)[1]) == 2
    assert [r["id"] for r in store.queue_front(mine, 10, ["base"])[0]] == []  # the running job is a turbo one
    # Priced in SQL: per song-second of DiT work for turbo, a flat 7 s for the others.
    turbo = [0, 0, 0, 0, 0.01, 0, 0, 0, 60]  # k0, k_src, k_lm_a, k_lm_b, k_dit, k_audio, k_items, k_lm_task, expected
    flat = [7, 0, 0, 0, 0, 0, 0, 0, 60]
    assert store.queue_ahead_total(mine, {"turbo": turbo}, flat) == (4, pytest.approx(7 + 0.01 * (90 + 160) * 8 + 7))
    assert [(r["id"], r["stage"], r["progress"], r["items"]) for r in running_now] == [(running.id, "dit", 0.5, 1)]


def test_prune_deletes_old_finished_jobs_in_batches(store, engine):
    old = [submit_one(store) for _ in range(5)]
    for job in store.claim("w", 5, now=at(1)):
        store.complete(job, "w", {}, now=at(2))
    fresh_done = store.submit(NewJob(request={}), now=at(3000)).id
    store.complete(store.claim("w", 1, now=at(3000))[0], "w", {}, now=at(3001))
    waiting = store.submit(NewJob(request={}), now=at(0)).id

    batches = list(store.prune_finished(ttl_seconds=3600, batch=2, now=at(3700)))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert {i for b in batches for i in b} == set(old)
    assert store.get(fresh_done)["status"] == "succeeded"
    assert store.get(waiting)["status"] == "queued"


def test_stats_and_workers(store):
    submit_one(store)
    submit_one(store)
    job = store.claim("w", 1, now=at(1))[0]
    store.complete(job, "w", {}, now=at(4))
    store.register_worker("gpu-1", host="node-a", capacity=2, models=["acestep-v15-turbo"], state="READY", now=at(5))
    store.register_worker("gpu-2", host="node-b", capacity=1, models=[], state="STARTING", now=at(5))
    assert store.live_capacity(now=at(10)) == (2, 1)
    assert store.live_capacity(now=at(100)) == (0, 0)
    assert store.touch_worker("gpu-2", state="READY", now=at(100)) is True
    assert store.live_capacity(now=at(101)) == (1, 1)

    stats = store.stats(now=at(101))
    assert stats["counts"] == {"queued": 1, "succeeded": 1}
    assert stats["queue_depth"] == 1 and stats["live_workers"] == 1
    assert stats["avg_job_seconds"] == pytest.approx(3.0)
    store.remove_worker("gpu-2")
    assert store.touch_worker("gpu-2") is False
    assert [w["id"] for w in store.workers()] == ["gpu-1"]


def test_submit_wakes_listening_workers(store, db_url):
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN acestep_jobs")
        submit_one(store)
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in notes] == ["acestep_jobs"]


def test_database_checks_reject_bad_rows(engine):
    from db import StoreError
    from db.store import translated_errors

    with pytest.raises(StoreError), translated_errors(), engine.connect() as conn:
        conn.execute(text("INSERT INTO jobs (status) VALUES ('exploded')"))


def test_bulk_submit_keeps_every_field_and_the_input_order(store):
    jobs = [
        NewJob(request={"i": 0}),
        NewJob(request={"i": 1}, priority=3, model="acestep-v15-base", task_type="cover", items=3, audio_seconds=2.5,
               dit_steps=32, lm_mode=2),
    ]
    ids = store.submit_many(jobs, owner="key-a", max_attempts=5, now=at(0))
    rows = [store.get(job_id) for job_id in ids]
    assert [r["request"] for r in rows] == [{"i": 0}, {"i": 1}]
    assert (rows[0]["priority"], rows[0]["model"], rows[0]["task_type"]) == (0, "", "text2music")
    assert (rows[1]["priority"], rows[1]["model"], rows[1]["task_type"]) == (3, "acestep-v15-base", "cover")
    assert {(r["owner"], r["max_attempts"]) for r in rows} == {("key-a", 5)}
    features = ("items", "audio_seconds", "dit_steps", "lm_mode")
    assert [tuple(r[k] for k in features) for r in rows] == [(1, None, 8, 0), (3, 2.5, 32, 2)]
    assert store.submit_many([]) == []
