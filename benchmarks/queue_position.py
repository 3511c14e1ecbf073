"""How long a poll's queue_position and queue_ahead_total (its ETA sum) take with a deep queue.

    python benchmarks/queue_position.py [--url postgresql://...] [--queued 100000]
"""

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import JobStore, NewJob, make_engine  # noqa: E402
from handler.http.cost_model import fit_cost_model  # noqa: E402
from scratch_database import bench_server, scratch_database  # noqa: E402


def timed_ms(call, repeat: int = 30) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Postgres server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--queued", type=int, default=100_000)
    args = parser.parse_args()

    with scratch_database(bench_server(args.url), "bench_position") as url:
        store = JobStore(make_engine(url, pool_size=1))
        ids: list[uuid.UUID] = []
        for _ in range(0, args.queued, 1000):  # priorities 0, 1, 2 in turn; ids[-2] ends up last in line
            ids += store.submit_many([NewJob(request={}, priority=i % 3, model="turbo", audio_seconds=30.0) for i in range(1000)])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE jobs")
        costs, default = fit_cost_model([]).sql_costs()
        print(f"{args.queued} queued jobs (median of 30 calls each):")
        for label, job_id in [("first in line", ids[0]), ("middle", ids[len(ids) // 2]), ("last", ids[-2])]:
            position = store.queue_position(job_id)
            position_ms = timed_ms(lambda job_id=job_id: store.queue_position(job_id))
            eta_ms = timed_ms(lambda job_id=job_id: store.queue_ahead_total(job_id, costs, default))
            print(f"  {label:<14} position {position:>7}: queue_position {position_ms:.2f} ms, "
                  f"queue_ahead_total {eta_ms:.2f} ms")


if __name__ == "__main__":
    main()
