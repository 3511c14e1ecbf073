"""queue_position and eta_seconds from the rank snapshot agree with the exact count."""

import random
from datetime import datetime, timedelta, timezone

import pytest

from db import NewJob
from handler.http.eta import CostModel, QueueEstimator, fit_cost_model

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def exact_eta_ahead(store, job_id, model: CostModel) -> float:
    return sum(model.seconds(q["model"], q["dit_units"], q["lm_units"], q["jobs"]) for q in store.eta_inputs(job_id).queued)


@pytest.fixture
def deep_queue(store):
    # Finished jobs to fit a cost model on: turbo takes 2 s + 0.01 s per DiT unit.
    for units in range(100, 1100, 100):
        store.submit(NewJob(request={}, model="turbo", dit_units=float(units)), now=T0)
        job = store.claim("w", 1, now=T0)[0]
        store.complete(job, "w", {}, now=T0 + timedelta(seconds=2 + 0.01 * units))
    rng = random.Random(3)
    jobs = [
        NewJob(request={}, priority=rng.choice([0, 0, 1, 2]), model=rng.choice(["turbo", "base"]),
               dit_units=float(rng.randint(100, 1000)), lm_units=float(rng.choice([0, 50])))
        for _ in range(3000)
    ]
    ids = []
    for start in range(0, len(jobs), 500):
        ids += store.submit_many(jobs[start:start + 500], now=T0 + timedelta(seconds=start))
    return ids


def test_snapshot_positions_and_work_match_the_exact_count(store, deep_queue):
    estimator = QueueEstimator(store, step=100, exact_up_to=200, snapshot_seconds=3600)
    model = fit_cost_model(store.cost_samples())
    assert model.coefficients["turbo"][1] == pytest.approx(0.01)
    for job_id in random.Random(5).sample(deep_queue, 150):
        job = store.get(job_id)
        position, eta = estimator.estimate(job)
        assert position == store.queue_position(job_id)
        assert eta == pytest.approx(exact_eta_ahead(store, job_id, model), abs=0.1)


def test_a_stale_snapshot_is_off_by_at_most_what_changed_and_refreshes(store, deep_queue):
    estimator = QueueEstimator(store, step=100, exact_up_to=200, snapshot_seconds=3600)
    last = store.get(deep_queue[-1])
    assert estimator.estimate(last)[0] == store.queue_position(last["id"])
    store.claim("w", 50)
    stale = estimator.estimate(last)[0]
    exact = store.queue_position(last["id"])
    assert 0 <= stale - exact <= 50
    fresh = QueueEstimator(store, step=100, exact_up_to=200, snapshot_seconds=0)
    assert fresh.estimate(last)[0] == exact


def test_cost_model_is_fitted_per_model():
    samples = [{"model": "turbo", "dit_units": u, "lm_units": 0.0, "seconds": 2.0 + 0.01 * u} for u in range(100, 1000, 100)]
    samples += [{"model": "base", "dit_units": 500.0, "lm_units": 0.0, "seconds": 40.0}] * 3
    model = fit_cost_model(samples)
    assert model.seconds("turbo", 2000.0, 0.0) == pytest.approx(22.0)
    assert "base" not in model.coefficients  # too few samples: priced at the average
    assert model.seconds("base", 500.0, 0.0) == pytest.approx(model.average)
    assert fit_cost_model([]).seconds("anything", 1.0, 1.0) == 30.0
