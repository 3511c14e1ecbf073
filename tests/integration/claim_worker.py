"""A worker process for the concurrency test: claims until the queue is empty, completes each job,
and records every completion the store accepted in `completions`."""

import random
import sys

from sqlalchemy import text

from db import JobStore, make_engine


def main(url: str, worker_id: str) -> None:
    engine = make_engine(url, pool_size=1)
    store = JobStore(engine)
    idle_rounds = 0
    while idle_rounds < 3:
        jobs = store.claim(worker_id, random.randint(1, 16))
        if not jobs:
            idle_rounds += 1
            continue
        idle_rounds = 0
        written = store.complete_many([(job, {"worker": worker_id}) for job in jobs], worker_id)
        with engine.connect() as conn:
            conn.execute(
                text("INSERT INTO completions (job_id, worker) SELECT unnest(CAST(:ids AS uuid[])), :worker"),
                {"ids": list(written), "worker": worker_id},
            )
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
