"""queue_position and eta_seconds: the SQL pricing agrees with the cost model's, the rank snapshot
with the exact count, and running jobs add their remaining work."""

import random
from datetime import datetime, timedelta, timezone

import pytest

from db import NewJob, WorkerState
from handler.http.cost_model import PRIORS, Work, fit_cost_model
from handler.http.eta import QueueEstimator, competition

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEATURES = ("model", "task_type", "items", "audio_seconds", "dit_steps", "lm_mode")


def random_job(rng: random.Random, priority: int | None = None) -> NewJob:
    task = rng.choice(["text2music", "text2music", "cover", "cover-nofsq", "repaint", "lm_format"])
    return NewJob(
        request={}, priority=rng.choice([0, 0, 1, 2]) if priority is None else priority,
        model=rng.choice(["turbo", "base", "unseen"]), task_type=task, items=rng.randint(1, 4),
        audio_seconds=rng.choice([None, 10.0, 20.48, 30.72, 95.5, 240.0]), dit_steps=rng.choice([8, 32, 50]),
        lm_mode=rng.choice([0, 1, 2]),
    )


def finish(store, job: NewJob, seconds: float, stages: dict[str, float]) -> None:
    store.submit(job, now=T0)
    claimed = store.claim("w", 1, now=T0)[0]
    store.complete(claimed, "w", {}, timings={"stages": stages, "audio_seconds": job.audio_seconds, "batch_jobs": 1},
                   now=T0 + timedelta(seconds=seconds))


@pytest.fixture
def deep_queue(store):
    # Finished turbo jobs to learn from: the DiT takes 0.002 s per song-second-step.
    for seconds in (10.0, 30.0, 60.0, 120.0, 240.0) * 4:
        dit = 0.002 * seconds * 8
        finish(store, NewJob(request={}, model="turbo", audio_seconds=seconds), dit + 1.0, {"dit": dit, "vae": 0.5})
    rng = random.Random(3)
    jobs = [random_job(rng) for _ in range(3000)]
    ids = []
    for start in range(0, len(jobs), 500):
        ids += store.submit_many(jobs[start:start + 500], now=T0 + timedelta(seconds=start))
    return ids


def competing(store, job_id):
    """The DiTs whose jobs compete with this one while no worker is live: its own (and "", any)."""
    return competition([], store.get(job_id))[0]


def priced_ahead(store, job_id, model) -> float:
    """The work up to and including the job, priced in Python over every competing queued row in claim order."""
    _, rows = store.queue_front(job_id, 10**6, competing(store, job_id))
    assert rows[-1]["id"] == job_id
    return sum(model.seconds(Work.of(r)) for r in rows)


def test_sql_pricing_matches_the_cost_model(store):
    rng = random.Random(11)
    jobs = [random_job(rng, priority=0) for _ in range(200)]
    ids = sorted(store.submit_many(jobs, now=T0))  # one created_at: claim order is by id
    model = fit_cost_model([{"model": "turbo", "task_type": "text2music", "items": 2, "audio_seconds": 30.0,
                             "dit_steps": 8, "lm_mode": 2, "duration_given": False, "seconds": 9.0,
                             "timings": {"stages": {"lm": 5.0, "dit": 1.0, "vae": 2.0}, "audio_seconds": 30.0}}],
                           PRIORS["cpu-tiny"])
    costs, default = model.sql_costs()
    for n in (1, 57, 200):
        jobs_ahead, seconds = store.queue_ahead_total(ids[n - 1], costs, default)
        assert jobs_ahead == n
        assert seconds == pytest.approx(sum(model.seconds(Work.of(store.get(i))) for i in ids[:n]), rel=1e-9)


def test_snapshot_positions_and_work_match_the_exact_count(store, deep_queue):
    estimator = QueueEstimator(store, prior="gpu", step=100, exact_up_to=200, simulate_up_to=0, snapshot_seconds=3600)
    model = estimator.cost_model
    # Learned from 20 jobs (still pulled a little toward the prior's 0.00052).
    assert model.of("turbo").stages["dit"].b == pytest.approx(0.002, rel=0.3)
    for job_id in random.Random(5).sample(deep_queue, 150):
        job = store.get(job_id)
        position, eta = estimator.estimate(job)
        assert position == store.queue_position(job_id, competing(store, job_id))
        assert eta == pytest.approx(priced_ahead(store, job_id, model), abs=0.1)  # one slot, nothing running


def test_a_stale_snapshot_is_off_by_at_most_what_changed_and_refreshes(store, deep_queue):
    estimator = QueueEstimator(store, step=100, exact_up_to=200, simulate_up_to=0, snapshot_seconds=3600)
    last = store.get(deep_queue[-1])
    models = competing(store, last["id"])
    assert estimator.estimate(last)[0] == store.queue_position(last["id"], models)
    store.claim("w", 50)
    stale = estimator.estimate(last)[0]
    exact = store.queue_position(last["id"], models)
    assert 0 <= stale - exact <= 50
    fresh = QueueEstimator(store, step=100, exact_up_to=200, simulate_up_to=0, snapshot_seconds=0)
    assert fresh.estimate(last)[0] == exact


def test_the_first_jobs_are_scheduled_onto_the_worker_slots(store):
    """Two slots, one running job near its end: the first queued job starts at once on the free slot,
    the second when the running one ends, the third when the first slot frees again."""
    prior = PRIORS["gpu"]
    estimator = QueueEstimator(store, prior="gpu", refit_seconds=3600)
    store.register_worker("w", host="h", capacity=2, models=["turbo"], state=WorkerState.READY)
    store.submit(NewJob(request={}, model="turbo", audio_seconds=100.0), now=T0)
    running = store.claim("w", 1)[0]
    store.heartbeat(running, "w", stage="vae", progress=0.95)  # done with the VAE; encoding and upload left
    ids = [store.submit(NewJob(request={}, model="turbo", audio_seconds=s)).id for s in (60.0, 30.0, 30.0)]
    own = [prior.seconds(Work(model="turbo", audio_seconds=s)) for s in (60.0, 30.0, 30.0)]
    left = prior.remaining(Work(model="turbo", audio_seconds=100.0), "vae", 0.95)
    assert 0 < left < prior.seconds(Work(model="turbo", audio_seconds=100.0)) / 2
    etas = [estimator.estimate(store.get(i)) for i in ids]
    assert [position for position, _ in etas] == [1, 2, 3]
    assert etas[0][1] == pytest.approx(own[0], abs=0.06)
    assert etas[1][1] == pytest.approx(left + own[1], abs=0.06)
    assert etas[2][1] == pytest.approx(min(own[0], left + own[1]) + own[2], abs=0.06)
    assert all(eta > 0 for _, eta in etas)


def test_a_running_job_reports_its_remaining_work_shrinking(store):
    estimator = QueueEstimator(store, prior="gpu", refit_seconds=3600)
    store.submit(NewJob(request={}, model="turbo", audio_seconds=None, lm_mode=2), now=T0)
    job = store.claim("w", 1)[0]
    seen = []
    for stage, progress in (("claimed", 0.0), ("lm", 0.1), ("lm", 0.25), ("dit", 0.5), ("vae", 0.9)):
        store.heartbeat(job, "w", stage=stage, progress=progress)
        seen.append(estimator.estimate(store.get(job.id)))
    assert all(position == 0 for position, _ in seen)
    etas = [eta for _, eta in seen]
    assert etas == sorted(etas, reverse=True) and etas[-1] < etas[0] / 5
    # The LM chose 10 s: the remaining DiT/VAE work is priced on it, below the 120 s prior's.
    before = estimator.estimate(store.get(job.id))[1]
    store.reprice(job, "w", 10.0)
    assert store.get(job.id)["audio_seconds"] == 10.0
    assert estimator.estimate(store.get(job.id))[1] < before


def test_a_job_claimed_a_moment_ago_still_holds_its_slot(store):
    """The running jobs and the queue ahead are read at one moment: right after a claim the claimed
    job is running, not missing from both (which made a busy slot look free)."""
    prior = PRIORS["gpu"]
    estimator = QueueEstimator(store, prior="gpu", refit_seconds=3600)
    store.register_worker("w", host="h", capacity=1, models=["turbo"], state=WorkerState.READY)
    first = store.submit(NewJob(request={}, model="turbo", audio_seconds=120.0), now=T0).id
    second = store.submit(NewJob(request={}, model="turbo", audio_seconds=30.0)).id
    own = [prior.seconds(Work(model="turbo", audio_seconds=s)) for s in (120.0, 30.0)]
    assert estimator.estimate(store.get(second)) == (2, pytest.approx(sum(own), abs=0.06))
    claimed = store.claim("w", 1)[0]
    assert claimed.id == first
    position, eta = estimator.estimate(store.get(second))  # at once: nothing is cached across the claim
    assert position == 1 and eta == pytest.approx(sum(own), abs=0.06)
