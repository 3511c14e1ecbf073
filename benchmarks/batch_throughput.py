"""Jobs per second through `acestep-serverless dev` with ACESTEP_WORKER_BATCH_JOBS = 1, 4, 8 (the real
pipeline: tiny random checkpoints on CPU, or whatever ACESTEP_CHECKPOINT_DIR names on a GPU machine).

    python benchmarks/batch_throughput.py                        # 16 jobs of 10 s, batch-jobs 1 4 8
    python benchmarks/batch_throughput.py --jobs 32 --seconds 60 --batch-jobs 1 8
    python benchmarks/batch_throughput.py --seconds 10 14 18 22 --thinking   # mixed lengths, LM codes

Each setting starts its own `dev` (embedded Postgres, API, one worker), waits until the worker is
live, submits every job at once (one song each, different captions and seeds, the same length and
sampler settings, metas given so the LM is not needed), and times from the first submit to the last
job's end. Several --seconds are cycled over the jobs (songs of several lengths share the DiT's calls);
--thinking has the LM write every job's audio codes (one LM pass per claimed batch). Printed: jobs/s,
seconds per job, and the speed-up over the first setting."""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.http_harness import free_port, interrupt  # noqa: E402


def start_dev(data_dir: Path, batch_jobs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ACESTEP_DATABASE_URL", "ACESTEP_PIPELINE")}
    env |= {"ACESTEP_DATA_DIR": str(data_dir), "ACESTEP_PORT": str(port), "ACESTEP_WORKER_BATCH_JOBS": str(batch_jobs),
            "ACESTEP_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).json()["data"]["live_workers"] >= 1:
                return proc, base
        except (httpx.TransportError, KeyError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"dev exited:\n{proc.stdout.read()}")
        time.sleep(0.5)
    raise SystemExit("dev did not get a live worker within 600 s")


def run(batch_jobs: int, jobs: int, seconds: list[float], thinking: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_dev(Path(tmp), batch_jobs)
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                start = time.monotonic()
                ids = []
                for i in range(jobs):
                    answer = client.post("/v1/music/generate", json={
                        "caption": f"song {i}: {'calm piano' if i % 2 else 'an energetic rock tune with drums'}",
                        "lyrics": "[Instrumental]", "audio_duration": seconds[i % len(seconds)], "batch_size": 1,
                        "thinking": thinking, "bpm": 100, "key_scale": "C major", "time_signature": "4",
                        "use_random_seed": False, "seed": i,
                    })
                    if answer.status_code != 200:
                        raise SystemExit(f"submit refused ({answer.status_code}): {answer.text}")
                    ids.append(answer.json()["job_id"])
                pending = set(ids)
                while pending:
                    for job_id in list(pending):
                        job = client.get(f"/v1/jobs/{job_id}").json()
                        if job["status"] in ("succeeded", "failed", "canceled"):
                            if job["status"] != "succeeded":
                                raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
                            pending.discard(job_id)
                    time.sleep(0.2)
                elapsed = time.monotonic() - start
        finally:
            interrupt(proc)
    return {"batch_jobs": batch_jobs, "jobs": jobs, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0], help="song lengths, cycled over the jobs")
    parser.add_argument("--thinking", action="store_true", help="the LM writes each job's audio codes")
    parser.add_argument("--batch-jobs", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    lengths = "/".join(f"{s:g}" for s in args.seconds)
    print(f"{args.jobs} jobs of {lengths} s{', thinking' if args.thinking else ''} through dev "
          f"({os.environ.get('ACESTEP_CHECKPOINT_DIR') or 'tiny checkpoints'})")
    print(f"{'batch-jobs':>10} {'total s':>8} {'jobs/s':>7} {'s/job':>6} {'speed-up':>8}")
    first = None
    for batch_jobs in args.batch_jobs:
        row = run(batch_jobs, args.jobs, args.seconds, args.thinking)
        rate = row["jobs"] / row["seconds"]
        first = first or rate
        print(f"{batch_jobs:>10} {row['seconds']:>8.1f} {rate:>7.3f} {row['seconds'] / row['jobs']:>6.2f} "
              f"{rate / first:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
