"""How fast progress and cancels travel (issue 14): the real API and worker, the real pipeline.

Starts `acestep-serverless dev` (tiny random checkpoints unless --checkpoint-dir; one worker, the
default heartbeat of 10 s) in a fresh data directory and a fresh database (--url: an API that is
already running instead). Every job is watched by polling GET /v1/jobs/{id} every --poll seconds.

1. Progress: --runs jobs (thinking=true, so the LM, DiT and VAE all run) run to the end. Reported:
   the gaps between the polls at which (stage, progress) changed while the job ran (median, p90,
   max), how long each stage was seen, and, per job, the time from the claim (started_at) to the
   first poll showing a stage: an upper bound of how late the first report becomes visible.
2. Cancel: for each of lm, dit and vae, --cancels jobs are canceled (POST /v1/jobs/{id}/cancel) at
   the first poll that shows them in that stage. Reported: the time from sending the cancel to the
   first poll showing `canceled` (median, max), the stage the last running poll showed, and whether
   the cancel's own answer showed it pending (status running, cancel_requested true).

Goals: progress visible within 1 s, a cancel effective in under 2 s.

    python benchmarks/progress_cancel.py [--duration 120] [--steps 8] [--runs 2] [--cancels 3]
    python benchmarks/progress_cancel.py --url http://gpu-host:8001 --duration 240
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dev_deployment import dev_deployment  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")
CANCEL_STAGES = ("lm", "dit", "vae")


@dataclass
class Watch:
    """The polls of one job: (local monotonic time, local wall clock, job view), each taken as the poll was sent."""

    job_id: str
    polls: list[tuple[float, float, dict]] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.polls[-1][2]


def submit(http: httpx.Client, duration: float, steps: int, seed: int) -> str:
    body = {"caption": "slow emotional piano ballad", "lyrics": "[verse]\nHello world", "thinking": True,
            "audio_duration": duration, "inference_steps": steps, "batch_size": 1, "use_random_seed": False,
            "seed": seed, "audio_format": "wav", "lm_backend": "pt"}
    answer = http.post("/v1/music/generate", json=body)
    answer.raise_for_status()
    return answer.json()["job_id"]


def poll_until(http: httpx.Client, watch: Watch, interval: float, done, timeout: float) -> None:
    """Poll every `interval` s until `done(view)` is true or the job is finished."""
    deadline = time.monotonic() + timeout
    while True:
        started, wall = time.monotonic(), time.time()
        view = http.get(f"/v1/jobs/{watch.job_id}").json()
        watch.polls.append((started, wall, view))
        if done(view) or view["status"] in TERMINAL:
            return
        if started > deadline:
            raise TimeoutError(f"job {watch.job_id} still {view['status']} after {timeout:.0f} s")
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def progress_gaps(watch: Watch) -> tuple[list[float], dict[str, float], float | None]:
    """Gaps between polls at which (stage, progress) changed while running; seconds each stage was
    seen (first to last poll showing it); the claim (the row's started_at) to the first poll showing
    a stage, on the wall clock (the API's and this machine's: the same one unless --url)."""
    running = [(t, wall, v) for t, wall, v in watch.polls if v["status"] == "running"]
    changes, seen, last = [], {}, None
    for t, _, view in running:
        where = (view["stage"], view["progress"])
        if where != last:
            changes.append(t)
            last = where
        if view["stage"]:
            first, _ = seen.get(view["stage"], (t, t))
            seen[view["stage"]] = (first, t)
    first_stage = next(((wall, v) for _, wall, v in running if v["stage"] and v["stage"] != "claimed"), None)
    visible = first_stage[0] - first_stage[1]["started_at"] if first_stage else None
    gaps = [b - a for a, b in zip(changes, changes[1:])]
    return gaps, {stage: b - a for stage, (a, b) in seen.items()}, visible


def cancel_in(http: httpx.Client, stage: str, duration: float, steps: int, seed: int, interval: float,
              timeout: float) -> dict:
    """One job canceled at the first poll that shows it in `stage`."""
    watch = Watch(submit(http, duration, steps, seed))
    poll_until(http, watch, interval, lambda view: view["status"] == "running" and view["stage"] == stage, timeout)
    if watch.last["status"] in TERMINAL:
        return {"stage": stage, "missed": f"ended {watch.last['status']} before a poll saw {stage}"}
    sent = time.monotonic()
    answer = http.post(f"/v1/jobs/{watch.job_id}/cancel").json()
    pending = answer["status"] == "running" and answer.get("cancel_requested") is True
    poll_until(http, watch, interval, lambda view: False, timeout)
    ended = next(t for t, _, v in watch.polls if v["status"] in TERMINAL)
    last_running = [v for _, _, v in watch.polls if v["status"] == "running"][-1]
    return {"stage": stage, "latency": ended - sent, "status": watch.last["status"], "pending_shown": pending,
            "last_stage": last_running["stage"], "last_progress": last_running["progress"]}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(base: str, args) -> None:
    with httpx.Client(base_url=base, timeout=30) as http:
        gaps, visible, stage_seconds = [], [], []
        for run_index in range(args.runs):
            watch = Watch(submit(http, args.duration, args.steps, seed=run_index))
            poll_until(http, watch, args.poll, lambda view: False, args.timeout)
            if watch.last["status"] != "succeeded":
                raise RuntimeError(f"job {watch.job_id} ended {watch.last['status']}: {watch.last.get('error')}")
            job_gaps, seen, first = progress_gaps(watch)
            gaps += job_gaps
            stage_seconds.append(seen)
            if first is not None:
                visible.append(first)
        print(f"progress: {args.runs} jobs, {len(gaps) + args.runs} distinct (stage, progress) seen by polls every "
              f"{args.poll * 1000:.0f} ms")
        print(f"  gap between changes while running: median {statistics.median(gaps):.3f} s, "
              f"p90 {quantile(gaps, 0.9):.3f} s, max {max(gaps):.3f} s")
        print("  claim -> first poll showing a stage (upper bound of the first report's delay): "
              + ", ".join(f"{v:.3f} s" for v in visible))
        for index, seen in enumerate(stage_seconds):
            print(f"  job {index + 1}: stage seen for " + ", ".join(f"{s} {t:.2f} s" for s, t in seen.items()), flush=True)
        print(f"cancel: {args.cancels} per stage, sent at the first poll showing the stage", flush=True)
        results = []
        for i in range(args.cancels):
            for stage in CANCEL_STAGES:
                results.append(cancel_in(http, stage, args.duration, args.steps, 100 + i, args.poll, args.timeout))
                print(f"    {results[-1]}", flush=True)
        for stage in CANCEL_STAGES:
            mine = [r for r in results if r["stage"] == stage]
            hits = [r for r in mine if "latency" in r]
            missed = [r["missed"] for r in mine if "missed" in r]
            if not hits:
                print(f"  {stage:4}: no cancel landed in the stage ({'; '.join(missed)})")
                continue
            latencies = [r["latency"] for r in hits]
            print(f"  {stage:4}: cancel -> canceled median {statistics.median(latencies):.3f} s, max {max(latencies):.3f} s "
                  f"({', '.join(f'{x:.3f}' for x in latencies)}); ended {sorted({r['status'] for r in hits})}; "
                  f"last running poll {[(r['last_stage'], round(r['last_progress'], 3)) for r in hits]}; "
                  f"pending shown by the cancel's answer {sum(r['pending_shown'] for r in hits)}/{len(hits)}"
                  + (f"; missed: {'; '.join(missed)}" if missed else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per song (long enough for each stage to last a while)")
    parser.add_argument("--steps", type=int, default=8, help="DiT steps")
    parser.add_argument("--runs", type=int, default=2, help="jobs run to the end for the progress figures")
    parser.add_argument("--cancels", type=int, default=3, help="canceled jobs per stage (lm, dit, vae)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for one job")
    parser.add_argument("--url", help="run against this already running API instead of starting dev")
    parser.add_argument("--postgres", help="Postgres server for the scratch database (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--checkpoint-dir", type=Path, help="real checkpoints (default: dev's tiny random ones)")
    parser.add_argument("--keep", action="store_true", help="keep dev's data directory (its log)")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; song {args.duration:g} s, "
          f"{args.steps} DiT steps, thinking=true (pt LM)", flush=True)
    if args.url:
        run(args.url.rstrip("/"), args)
    else:
        # dev caps the tiny LM's songs at 30 s; thinking needs codes for the whole song
        env = {"ACESTEP_DEFAULT_BATCH_SIZE": "1", "ACESTEP_LM_MAX_DURATION": str(max(30, math.ceil(args.duration)))}
        with dev_deployment(workers=1, env=env, postgres=args.postgres, checkpoint_dir=args.checkpoint_dir,
                            keep=args.keep) as deployment:
            run(deployment["url"], args)
    print(f"wall {time.monotonic() - started:.0f} s, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
