"""How good is eta_seconds? A simulated queue on a real database, in virtual time.

Jobs of two models with random durations run on one worker whose true cost is
  turbo: 1.0 s + 0.004 s per DiT unit, base: 3.0 s + 0.006 s per DiT unit   (units = duration x batch x steps),
with +-15 % noise. After a history of finished jobs, --queued jobs wait; the estimator the API uses
(QueueEstimator: cost model fitted on the history + the work ahead) predicts each one's wait, then
the worker runs them (timestamps injected, nothing sleeps) and the predictions are compared with
the actual finish times. In the same run: the reference server's estimate, position x the average
job time. Printed: median and p90 absolute error, relative to the actual wait.

    python benchmarks/eta_accuracy.py [--url postgresql://...] [--history 60] [--queued 200]
"""

import argparse
import random
import statistics
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import JobStore, NewJob, make_engine  # noqa: E402
from handler.http.eta import QueueEstimator  # noqa: E402
from scratch_database import bench_server, scratch_database  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
COST = {"turbo": (1.0, 0.004), "base": (3.0, 0.006)}
STEPS = {"turbo": 8, "base": 50}


def random_job(rng: random.Random) -> NewJob:
    model = rng.choice(["turbo", "turbo", "turbo", "base"])
    duration, batch = rng.choice([30, 60, 120, 240]), rng.choice([1, 2, 4])
    return NewJob(request={}, model=model, dit_units=float(duration * batch * STEPS[model]))


def true_seconds(job: dict, rng: random.Random) -> float:
    a, b = COST[job["model"]]
    return (a + b * job["dit_units"]) * rng.uniform(0.85, 1.15)


def run_jobs(store: JobStore, count: int, clock: datetime, rng: random.Random) -> tuple[datetime, dict]:
    """The worker takes `count` jobs in claim order; returns the clock after and each job's finish time."""
    finished = {}
    for _ in range(count):
        claimed = store.claim("sim-worker", 1, now=clock)
        if not claimed:
            break
        job = store.get(claimed[0].id)
        clock += timedelta(seconds=true_seconds(job, rng))
        store.complete(claimed[0], "sim-worker", {}, now=clock)
        finished[job["id"]] = clock
    return clock, finished


def errors(predicted: dict, actual: dict, start: datetime) -> list[float]:
    return [abs(predicted[j] - (actual[j] - start).total_seconds()) / (actual[j] - start).total_seconds() for j in predicted]


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {100 * statistics.median(ordered):5.1f} %, p90 {100 * ordered[int(0.9 * len(ordered))]:5.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Postgres server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--history", type=int, default=60)
    parser.add_argument("--queued", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with scratch_database(bench_server(args.url), "bench_eta") as url:
        store = JobStore(make_engine(url, pool_size=2))
        store.submit_many([random_job(rng) for _ in range(args.history)], now=T0)
        clock, _ = run_jobs(store, args.history, T0, rng)
        history = [s["seconds"] for s in store.cost_samples()]

        ids = store.submit_many([random_job(rng) for _ in range(args.queued)], now=clock)
        estimator = QueueEstimator(store)
        ours, flat = {}, {}
        average = statistics.mean(history)
        for job_id in ids:
            job = store.get(job_id)
            position, eta = estimator.estimate(job)
            ours[job_id], flat[job_id] = eta, position * average
        _, finished = run_jobs(store, args.queued, clock, rng)

    print(f"{args.queued} queued jobs after {args.history} finished ones, one worker, two models:")
    print(f"  eta_seconds (cost model per model):      {summary(errors(ours, finished, clock))}")
    print(f"  position x average job time (reference): {summary(errors(flat, finished, clock))}")


if __name__ == "__main__":
    main()
