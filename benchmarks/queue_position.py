"""How long a poll's queue_position and eta_inputs take with a deep queue.

    python benchmarks/queue_position.py [--url postgresql://...] [--queued 100000]
"""

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import JobStore, NewJob, make_engine  # noqa: E402
from db.server import find_server  # noqa: E402
from migrations import upgrade  # noqa: E402


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

    server_url = find_server(args.url, Path(".acestep/bench-postgres"))
    name = f"bench_position_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        store = JobStore(make_engine(url, pool_size=1))
        ids: list[uuid.UUID] = []
        for _ in range(0, args.queued, 1000):  # priorities 0, 1, 2 in turn; ids[-2] ends up last in line
            ids += store.submit_many([NewJob(request={}, priority=i % 3, model="turbo", dit_units=1.0) for i in range(1000)])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE jobs")
        print(f"{args.queued} queued jobs (median of 30 calls each):")
        for label, job_id in [("first in line", ids[0]), ("middle", ids[len(ids) // 2]), ("last", ids[-2])]:
            position = store.queue_position(job_id)
            print(f"  {label:<14} position {position:>7}: queue_position {timed_ms(lambda: store.queue_position(job_id)):.2f} ms, "
                  f"eta_inputs {timed_ms(lambda: store.eta_inputs(job_id)):.2f} ms")
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
