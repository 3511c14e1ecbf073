"""Polling and submitting through HTTP with a deep queue.

Fills a fresh database with --queued jobs, starts `acestep-serverless serve` as its own process, then
measures: GET /v1/jobs/{id} latency for random queued jobs (sequential, p50/p99), the exact
queue-position count and the position + ETA estimate the API serves (p50/p99), and
POST /v1/music/generate throughput from --clients threads (another key than the deep queue's owner).

    python benchmarks/http_poll.py [--url postgresql://...] [--queued 100000] [--polls 1000]
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import JobStore, NewJob, make_engine  # noqa: E402
from handler.http.auth import create_api_key  # noqa: E402
from handler.http.eta import QueueEstimator  # noqa: E402
from scratch_database import bench_server, scratch_database  # noqa: E402


def percentiles(samples_ms: list[float]) -> str:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, max {ordered[-1]:.1f} ms"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def fill(store: JobStore, count: int, owner: str) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    request = {"caption": "upbeat pop song", "lyrics": "Hello world", "inference_steps": 8, "batch_size": 2}
    for _ in range(0, count, 1000):
        ids += store.submit_many(
            [NewJob(request=request, priority=random.choice([0, 0, 0, 1]), model="acestep-v15-turbo",
                    items=2, audio_seconds=60.0) for _ in range(1000)],
            owner=owner,
        )
    return ids


@contextmanager
def running_server(database_url: str, port: int, data_dir: str) -> Iterator[str]:
    """`acestep-serverless serve` in its own process; yields its base URL."""
    env = {**os.environ, "ACESTEP_DATABASE_URL": database_url, "ACESTEP_PORT": str(port), "ACESTEP_DATA_DIR": data_dir,
           "ACESTEP_REQUIRE_KEYS": "true", "ACESTEP_MAX_QUEUED_PER_KEY": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(base):
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not come up")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Postgres server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--polls", type=int, default=1000)
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    with scratch_database(bench_server(args.url), "bench_http") as url:
        store = JobStore(make_engine(url, pool_size=2))
        poller_id, poller_key = create_api_key(store, "poller")  # owns the deep queue
        _, submitter_key = create_api_key(store, "submitter")
        ids = fill(store, args.queued, poller_id)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE jobs")
        sample = random.Random(7).sample(ids, min(args.polls, len(ids)))

        query_ms, estimate_ms = [], []
        estimator = QueueEstimator(store)
        for job_id in sample:
            start = time.perf_counter()
            store.queue_position(job_id)
            query_ms.append(1000 * (time.perf_counter() - start))
            job = store.get(job_id)
            start = time.perf_counter()
            estimator.estimate(job)
            estimate_ms.append(1000 * (time.perf_counter() - start))

        with tempfile.TemporaryDirectory() as data_dir, running_server(url, args.port, data_dir) as base:
            poll_ms = []
            with httpx.Client(base_url=base, timeout=30, headers=bearer(poller_key)) as client:
                for job_id in sample[:50]:
                    client.get(f"/v1/jobs/{job_id}")  # warm-up
                for job_id in sample:
                    start = time.perf_counter()
                    response = client.get(f"/v1/jobs/{job_id}")
                    poll_ms.append(1000 * (time.perf_counter() - start))
                    assert response.status_code == 200 and response.json()["queue_position"] > 0

            per_client = args.submits // args.clients
            errors = []

            def submit_loop() -> None:
                with httpx.Client(base_url=base, timeout=30, headers=bearer(submitter_key)) as client:
                    for _ in range(per_client):
                        response = client.post("/v1/music/generate", json={"caption": "upbeat pop song", "inference_steps": 16})
                        if response.status_code != 200:
                            errors.append(response.status_code)

            threads = [threading.Thread(target=submit_loop) for _ in range(args.clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            submit_rate = per_client * args.clients / (time.perf_counter() - start)

        print(f"{args.queued} queued jobs, {len(sample)} random jobs polled ({os.cpu_count()} CPUs)")
        print(f"  exact queue_position count:  {percentiles(query_ms)}")
        print(f"  position + ETA as served:    {percentiles(estimate_ms)} (snapshot every 2 s + gap count)")
        print(f"  GET /v1/jobs/{{id}} over HTTP: {percentiles(poll_ms)}")
        print(f"  POST /v1/music/generate:      {submit_rate:.0f} jobs/s from {args.clients} clients"
              f"{f' ({len(errors)} errors)' if errors else ''}")


if __name__ == "__main__":
    main()
