"""The worker's overheads with a no-op pipeline (tests/fakes/pipelines.py:noop).

  * wake-up: an idle `acestep-serverless worker` (LISTEN/NOTIFY); jobs submitted one at a time;
    time from the row's created_at to its started_at (both the database's clock), p50/p99;
  * dev: `acestep-serverless dev` (embedded Postgres, local storage, HTTP, one worker); --jobs
    submitted over HTTP by 4 clients; jobs/s from the first submit to the last job finished.

    python benchmarks/worker_throughput.py [--url postgresql://...] [--samples 100] [--jobs 300]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import JobStore, make_engine  # noqa: E402
from scratch_database import bench_server, scratch_database  # noqa: E402
from tests.acceptance.worker_harness import submit  # noqa: E402

NOOP = {"ACESTEP_PIPELINE": "tests.fakes.pipelines:noop", "ACESTEP_DEFAULT_BATCH_SIZE": "1"}


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


def wakeup_latency(url: str, samples: int, data_dir: str) -> list[float]:
    store = JobStore(make_engine(url, pool_size=2))
    env = {**os.environ, **NOOP, "ACESTEP_DATABASE_URL": url, "ACESTEP_DATA_DIR": data_dir}
    worker = subprocess.Popen([sys.executable, "-m", "handler.cli", "worker"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: [w["state"] for w in store.workers()] == ["READY"])
        latencies = []
        for _ in range(samples):
            job_id = submit(store, caption="noop", batch_size=1)
            wait_until(lambda job_id=job_id: store.get(job_id)["status"] == "succeeded")
            row = store.get(job_id)
            latencies.append(1000 * (row["started_at"] - row["created_at"]).total_seconds())
            time.sleep(0.05)  # the worker goes idle and back to LISTEN
        return latencies
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def dev_throughput(jobs: int, clients: int, port: int) -> float:
    with tempfile.TemporaryDirectory() as data_dir:
        env = {k: v for k, v in os.environ.items() if k != "ACESTEP_DATABASE_URL"}
        env |= NOOP | {"ACESTEP_DATA_DIR": data_dir, "ACESTEP_PORT": str(port), "ACESTEP_MAX_QUEUED_PER_KEY": str(jobs)}
        dev = subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _live_workers(base) == 1)
            ids: list[str] = []
            start = time.perf_counter()

            def client() -> None:
                with httpx.Client(base_url=base, timeout=30) as http:
                    for _ in range(jobs // clients):
                        ids.append(http.post("/v1/music/generate", json={"caption": "noop"}).json()["job_id"])

            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with httpx.Client(base_url=base, timeout=30) as http:
                for job_id in ids:
                    wait_until(lambda job_id=job_id: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", timeout=300)
            return len(ids) / (time.perf_counter() - start)
        finally:
            dev.terminate()
            dev.wait(timeout=60)


def _live_workers(base: str) -> int:
    try:
        return httpx.get(f"{base}/health", timeout=1).json()["data"]["live_workers"]
    except (httpx.TransportError, KeyError, ValueError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Postgres server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with scratch_database(bench_server(args.url), "bench_worker") as url, tempfile.TemporaryDirectory() as data_dir:
        latencies = sorted(wakeup_latency(url, args.samples, data_dir))
    rate = dev_throughput(args.jobs, 4, args.port)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"submit -> claim, idle worker (LISTEN/NOTIFY), {len(latencies)} jobs: "
          f"p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms ({os.cpu_count()} CPUs)")
    print(f"dev with a no-op pipeline: {rate:.1f} jobs/s ({args.jobs} jobs submitted over HTTP by 4 clients, one worker)")


if __name__ == "__main__":
    main()
