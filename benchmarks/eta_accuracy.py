"""How accurate eta_seconds is on real runs, beside the reference server's estimate.

Starts `acestep-serverless dev` (tiny random checkpoints unless --checkpoint-dir) in a fresh data
directory and a fresh database, plus one more `worker` with dev's environment: two worker slots.
(--url: an API that is already running instead, e.g. on a GPU machine.) Then submits a seeded mix
through POST /v1/music/generate in waves: text2music of 10-240 s at batch 1-4, `thinking` jobs,
jobs whose duration the LM chooses (no audio_duration), cover and repaint of an uploaded WAV. The
warm-up wave runs to the end (the estimator learns from it); each scored wave is submitted at once
when none of the earlier jobs is still queued, so jobs meet the queue at several positions, some
behind running jobs.

For every job: the first poll (GET /v1/jobs/{id} right after the submit): queue_position and
eta_seconds; the actual time from that poll to the job's finished_at (the server's clock throughout).
The reference in the same run is upstream ACE-Step 1.5's API server (acestep/api_server.py):
eta = queue_position x avg_job_seconds, where the position counts queued jobs only (1-based, 0 once
a worker took the job, and then no ETA at all: the count the API's queue_position makes too, so
that is the position used) and the average is the mean run time (start to end, any outcome) of the
last 50 finished jobs, 5.0 s before any has finished, taken from this run's own jobs as they stood
at the moment of each first poll. A missing ETA counts as 0 s.

Reported: |eta - actual| / actual per job, its median and p90 per group, and the jobs that were not
finished at their first poll (so had work ahead of them) but got an ETA of 0 or none.
Goal (issue 14): median under 15 %, p90 under 35 %, no such zero.

    python benchmarks/eta_accuracy.py [--waves 4] [--jobs-per-wave 4] [--seed 1] [--out eta.json]
    python benchmarks/eta_accuracy.py --url http://gpu-host:8001 --out eta-gpu.json
"""

import argparse
import io
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dev_deployment import dev_deployment, health  # noqa: E402

REFERENCE_DEFAULT_SECONDS = 5.0  # upstream's ACESTEP_AVG_JOB_SECONDS default
REFERENCE_WINDOW = 50  # upstream's ACESTEP_AVG_WINDOW default
TERMINAL = ("succeeded", "failed", "canceled")
SOURCE_SECONDS = 20
GOAL_MEDIAN, GOAL_P90 = 0.15, 0.35
KIND_WEIGHTS = {"text2music": 5, "thinking": 2, "lm_duration": 1, "lm_metadata": 1, "cover": 1, "repaint": 1}
CAPTIONS = ["upbeat pop song", "slow emotional piano ballad", "energetic drum and bass", "lo-fi hip hop beat",
            "orchestral film score", "acoustic folk with guitar"]
LYRICS = ["", "[verse]\nHello world\n[chorus]\nSing along", "[instrumental]",
          "[verse]\nCity lights are calling\n[chorus]\nWe run all night"]


@dataclass
class Plan:
    """One request of the mix."""
    wave: int
    kind: str
    fields: dict
    upload: bool = False

    @property
    def thinking(self) -> bool:
        return bool(self.fields.get("thinking"))


@dataclass
class Record:
    """What the benchmark saw of one job (epoch seconds; `server` = the API's clock)."""
    plan: Plan
    job_id: str
    posted_at: float  # local, mid-request of the submit
    created_at: float  # server
    polled_at: float  # local, mid-request of the first poll
    first_status: str
    position: int
    eta: float | None
    stats_avg: float | None  # /v1/stats avg_job_seconds read right after the first poll
    final: dict = field(default_factory=dict)  # the job view once terminal

    @property
    def poll_server_time(self) -> float:
        return self.created_at + max(0.0, self.polled_at - self.posted_at)


def draw(rng: random.Random, wave: int, kind: str) -> Plan:
    """One request of `kind`; durations x batch stay within 240 s of audio so a CPU run stays short."""
    fields: dict = {"caption": rng.choice(CAPTIONS), "lyrics": rng.choice(LYRICS), "use_random_seed": False,
                    "seed": rng.randrange(2**31)}
    if kind == "text2music":
        duration = rng.choices([10, 20, 30, 60, 120, 240], [3, 3, 2, 2, 1, 1])[0]
        fields |= {"audio_duration": duration, "batch_size": rng.randint(1, min(4, 240 // duration))}
    elif kind == "thinking":
        fields |= {"audio_duration": rng.choice([10, 15, 20, 30]), "batch_size": rng.randint(1, 2), "thinking": True}
    elif kind == "lm_duration":
        fields |= {"batch_size": 1, "thinking": True}
    elif kind == "lm_metadata":  # thinking=false: the LM still fills the missing duration
        fields |= {"batch_size": rng.randint(1, 2)}
    elif kind == "cover":
        fields |= {"task_type": "cover", "batch_size": rng.randint(1, 2)}
    elif kind == "repaint":
        start = rng.choice([0, 5, 10])
        fields |= {"task_type": "repaint", "batch_size": 1, "repainting_start": start,
                   "repainting_end": start + rng.choice([5, 10])}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return Plan(wave, kind, fields, upload=kind in ("cover", "repaint"))


def make_mix(seed: int, waves: int, per_wave: int) -> list[list[Plan]]:
    """Wave 0 (warm-up) has every kind once (its text2music the longest, 240 s), then draws by
    KIND_WEIGHTS; the other waves draw only."""
    rng = random.Random(seed)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    mix = []
    for wave in range(waves):
        chosen = list(kinds) if wave == 0 else []
        chosen += rng.choices(kinds, weights, k=max(0, per_wave - len(chosen)))
        mix.append([draw(rng, wave, kind) for kind in chosen])
    mix[0][0].fields |= {"audio_duration": 240, "batch_size": 1}  # the warm-up spans the durations too
    return mix


def source_wav(seconds: int = SOURCE_SECONDS) -> bytes:
    """A short stereo chord, the source audio of cover and repaint jobs."""
    t = np.arange(48000 * seconds) / 48000
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * 0.2
    out = io.BytesIO()
    soundfile.write(out, np.stack([tone, tone], axis=1), 48000, format="WAV")
    return out.getvalue()


class Poller(threading.Thread):
    """Watches every open job: one list call each `interval` (status of the newest 100), then the job
    view of those that turned terminal or fell off that page, kept as the record's `final`."""

    def __init__(self, http: httpx.Client, interval: float = 0.2):
        super().__init__(daemon=True)
        self._http = http
        self._interval = interval
        self._lock = threading.Lock()
        self._open: dict[str, Record] = {}
        self.status: dict[str, str] = {}
        self._stop_event = threading.Event()
        self.error: Exception | None = None

    def watch(self, record: Record) -> None:
        with self._lock:
            self._open[record.job_id] = record
            self.status[record.job_id] = record.first_status

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def queued_count(self) -> int:
        with self._lock:
            return sum(1 for job_id in self._open if self.status.get(job_id) == "queued")

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self._interval):
                self._poll_once()
        except (httpx.HTTPError, KeyError, ValueError) as exc:  # the main thread reports it
            self.error = exc

    def _poll_once(self) -> None:
        listed = {j["job_id"]: j["status"] for j in self._http.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
        with self._lock:
            candidates = [(job_id, r) for job_id, r in self._open.items()
                          if listed.get(job_id, "gone") not in ("queued", "running")]
            self.status.update({job_id: s for job_id, s in listed.items() if job_id in self._open})
        for job_id, record in candidates:
            view = self._http.get(f"/v1/jobs/{job_id}").json()
            with self._lock:
                self.status[job_id] = view["status"]
                if view["status"] in TERMINAL:
                    record.final = view
                    del self._open[job_id]


def submit(http: httpx.Client, plan: Plan, wav: bytes) -> Record:
    """POST the plan, poll it once at once, read /v1/stats: the moment the ETAs are taken."""
    t0 = time.time()
    if plan.upload:
        form = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in plan.fields.items()}
        response = http.post("/v1/music/generate", data=form, files={"src_audio": ("source.wav", wav, "audio/wav")})
    else:
        response = http.post("/v1/music/generate", json=plan.fields)
    t1 = time.time()
    if response.status_code != 200:
        raise RuntimeError(f"submit of a {plan.kind} job refused: {response.status_code} {response.text}")
    job_id = response.json()["job_id"]
    view = http.get(f"/v1/jobs/{job_id}").json()
    t2 = time.time()
    stats = http.get("/v1/stats").json().get("data") or {}
    return Record(plan, job_id, (t0 + t1) / 2, view["created_at"], (t1 + t2) / 2, view["status"],
                  view["queue_position"], view["eta_seconds"], stats.get("avg_job_seconds"))


def wait_until(predicate, timeout: float, poller: Poller, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if poller.error:
            raise RuntimeError(f"polling failed: {poller.error}")
        if time.monotonic() > deadline:
            print(f"gave up waiting for {what} after {timeout:.0f} s", flush=True)
            return False
        time.sleep(0.2)
    return True


def run_mix(base: str, mix: list[list[Plan]], timeout: float, pause: float) -> list[Record]:
    wav = source_wav()
    records: list[Record] = []
    with httpx.Client(base_url=base, timeout=60) as http, httpx.Client(base_url=base, timeout=60) as poll_http:
        poller = Poller(poll_http)
        poller.start()
        try:
            for wave, plans in enumerate(mix):
                print(f"wave {wave} ({'warm-up' if wave == 0 else 'scored'}): {len(plans)} jobs", flush=True)
                for plan in plans:
                    record = submit(http, plan, wav)
                    records.append(record)
                    poller.watch(record)
                if wave == 0:
                    ok = wait_until(lambda: poller.open_count() == 0, timeout, poller, "the warm-up wave")
                else:
                    ok = wait_until(lambda: poller.queued_count() == 0, timeout, poller, "an empty queue")
                if not ok:
                    break
                time.sleep(pause)
            wait_until(lambda: poller.open_count() == 0, timeout, poller, "the last jobs")
        finally:
            poller.stop()
    return records


def reference_eta(record: Record, records: list[Record]) -> float | None:
    """Upstream's position x average at the moment of the record's first poll."""
    if record.position <= 0:
        return None
    now = record.poll_server_time
    done = sorted((r.final["finished_at"], r.final["finished_at"] - r.final["started_at"]) for r in records
                  if r.final.get("finished_at") and r.final.get("started_at") and r.final["finished_at"] <= now)
    runs = [seconds for _, seconds in done[-REFERENCE_WINDOW:]]
    average = statistics.mean(runs) if runs else REFERENCE_DEFAULT_SECONDS
    return record.position * average


def job_rows(records: list[Record]) -> list[dict]:
    rows = []
    for r in records:
        finished = r.final.get("finished_at")
        actual = finished - r.poll_server_time if finished is not None else None
        ref = reference_eta(r, records)
        scorable = actual is not None and actual > 0 and r.first_status in ("queued", "running")
        result = r.final.get("result") or {}
        rows.append({
            "job_id": r.job_id, "wave": r.plan.wave, "scored": r.plan.wave > 0, "kind": r.plan.kind,
            "thinking": r.plan.thinking, "request": r.plan.fields, "audio_duration": result.get("duration"),
            "status": r.final.get("status", "unfinished"), "first_status": r.first_status, "position": r.position,
            "eta": r.eta, "reference_eta": ref, "stats_avg_job_seconds": r.stats_avg, "actual": actual,
            "run_seconds": (finished - r.final["started_at"]) if finished and r.final.get("started_at") else None,
            "error": r.final.get("error"), "scorable": scorable,
            "eta_error": abs((r.eta or 0.0) - actual) / actual if scorable else None,
            "reference_error": abs((ref or 0.0) - actual) / actual if scorable else None,
        })
    return rows


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def summarise(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["scorable"]]
    groups = {
        "all": scored,
        "warm-up": [r for r in scored if not r["scored"]],
        "scored": [r for r in scored if r["scored"]],
        "scored, thinking": [r for r in scored if r["scored"] and r["thinking"]],
        "scored, no thinking": [r for r in scored if r["scored"] and not r["thinking"]],
        "scored, queued at poll": [r for r in scored if r["scored"] and r["position"] >= 1],
        "scored, running at poll": [r for r in scored if r["scored"] and r["position"] == 0],
    }
    groups |= {f"kind {kind}": [r for r in scored if r["kind"] == kind] for kind in KIND_WEIGHTS}
    summary = {}
    for name, group in groups.items():
        if not group:
            continue
        ours, ref = [r["eta_error"] for r in group], [r["reference_error"] for r in group]
        summary[name] = {
            "jobs": len(group),
            "eta_median": statistics.median(ours), "eta_p90": p90(ours),
            "reference_median": statistics.median(ref), "reference_p90": p90(ref),
            "eta_zero_with_work_ahead": sum(1 for r in group if not r["eta"]),
            "reference_zero_with_work_ahead": sum(1 for r in group if not r["reference_eta"]),
        }
    return summary


def goal_met(s: dict) -> bool:
    return s["eta_median"] < GOAL_MEDIAN and s["eta_p90"] < GOAL_P90 and s["eta_zero_with_work_ahead"] == 0


def fmt(value: float | None, spec: str = "7.1f") -> str:
    return format(value, spec) if value is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def print_report(rows: list[dict], summary: dict, header: str) -> None:
    print(f"\n{header}")
    print(f"{'wave':>4} {'kind':<12} {'audio s':>7} {'batch':>5} {'think':>5} {'pos':>3} {'eta':>7} {'ref':>7} "
          f"{'actual':>7} {'run':>6} {'eta err':>8} {'ref err':>8}")
    for r in rows:
        asked = r["request"].get("audio_duration")
        chosen = f"{r['audio_duration']:g}" if r["audio_duration"] else "?"
        audio = f"{asked:g}" if asked else ("src" if r["kind"] in ("cover", "repaint") else f"LM {chosen}")
        err = (lambda v: f"{100 * v:7.1f}%" if v is not None else "       -")
        print(f"{r['wave']:>4} {r['kind']:<12} {audio:>7} {r['request']['batch_size']:>5} {'yes' if r['thinking'] else 'no':>5} "
              f"{r['position']:>3} {fmt(r['eta'])} {fmt(r['reference_eta'])} {fmt(r['actual'])} {fmt(r['run_seconds'], '6.1f')} "
              f"{err(r['eta_error'])} {err(r['reference_error'])}" + ("" if r["status"] == "succeeded" else f"  {r['status']}"))
    print(f"\n{'group':<26} {'jobs':>4}  {'eta_seconds median / p90':>26}  {'position x average median / p90':>32}  "
          "zero ETA (ours/ref)")
    for name, s in summary.items():
        print(f"{name:<26} {s['jobs']:>4}  {100 * s['eta_median']:11.1f} % / {100 * s['eta_p90']:6.1f} %  "
              f"{100 * s['reference_median']:17.1f} % / {100 * s['reference_p90']:6.1f} %  "
              f"{s['eta_zero_with_work_ahead']:>4} / {s['reference_zero_with_work_ahead']}")
    for name in ("all", "scored"):
        if name in summary:
            print(f"goal (median < {100 * GOAL_MEDIAN:.0f} %, p90 < {100 * GOAL_P90:.0f} %, no zero ETA) on {name}: "
                  f"{'met' if goal_met(summary[name]) else 'NOT met'}")


def describe(base: str) -> str:
    h = health(base)
    return (f"{h.get('worker_slots', '?')} worker slots, DiT {h.get('loaded_model')}, LM {h.get('loaded_lm_model')}, "
            f"{os.cpu_count()} CPUs here, load average {os.getloadavg()[0]:.1f}")


def recorded_stages(database_url: str, records: list[Record]) -> list[dict]:
    """Every finished job's recorded stage seconds and features, read from its row, with the
    samples the estimator had at the job's first poll (those finished before it)."""
    from sqlalchemy import text

    from db.engine import make_engine

    engine = make_engine(database_url, pool_size=1)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id::text, model, task_type, items, audio_seconds, dit_steps, lm_mode, timings, status, "
            "jsonb_typeof(request->'audio_duration') = 'number', "
            "EXTRACT(EPOCH FROM finished_at - started_at)::float8, EXTRACT(EPOCH FROM finished_at)::float8, "
            "worker_id, EXTRACT(EPOCH FROM started_at)::float8 FROM jobs")).fetchall()
    engine.dispose()
    by_id = {r[0]: r for r in rows}
    out = []
    for record in records:
        row = by_id.get(record.job_id)
        if row is None:
            continue
        out.append({"job_id": record.job_id, "kind": record.plan.kind, "poll": record.poll_server_time,
                    "model": row[1], "task_type": row[2], "items": row[3], "audio_seconds": row[4],
                    "dit_steps": row[5], "lm_mode": row[6], "timings": row[7], "status": row[8],
                    "duration_given": row[9], "seconds": row[10], "finished": row[11],
                    "worker_id": row[12], "started": row[13]})
    return out


def print_stages(stage_rows: list[dict], prior: str) -> None:
    """Per job: the seconds each stage recorded against the cost model's price of it, fitted (as the
    API does, from dev's `prior`) on the jobs that had finished by the job's first poll."""
    from eta_replay import priced_at_poll

    print("\nrecorded stage seconds vs the cost model's price at the job's first poll (recorded/priced)")
    for row, priced in priced_at_poll(stage_rows, prior):
        recorded = row["timings"].get("stages") or {}
        parts = " ".join(f"{stage} {recorded.get(stage, 0):.1f}/{priced.get(stage, 0):.1f}"
                         for stage in priced if recorded.get(stage, 0) > 0.2 or priced.get(stage, 0) > 0.2)
        print(f"  {row['kind']:<12} x{row['items']} {row['audio_seconds'] or 0:>5.0f} s{' cold' if row['timings'].get('cold') else '     '} "
              f"batch_jobs {row['timings'].get('batch_jobs', 1)} run {row['seconds']:.1f}/{sum(priced.values()):.1f}: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=4, help="waves, the first being the warm-up (default 4)")
    parser.add_argument("--jobs-per-wave", type=int, default=4, help="jobs per wave (the warm-up has at least one of each kind)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every job and the summary here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (logs, audio)")
    parser.add_argument("--url", help="run against this already running API instead of starting dev")
    parser.add_argument("--workers", type=int, default=2, help="worker slots to start (dev's worker + N-1 more)")
    parser.add_argument("--postgres", help="Postgres server for the scratch database (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--checkpoint-dir", type=Path, help="real checkpoints (default: dev's tiny random ones)")
    parser.add_argument("--lm-max-duration", type=int, default=60, help="ACESTEP_LM_MAX_DURATION for dev (default 60)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between a wave's queue emptying and the next wave")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="each worker process on a CPU of its own with one torch thread (a device per slot)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="longest wait for one wave")
    args = parser.parse_args()
    if args.waves < 2 or args.jobs_per_wave < 1:
        parser.error("--waves must be at least 2 (a warm-up and a scored wave) and --jobs-per-wave at least 1")

    # SIGTERM unwinds like Ctrl-C, so dev, the worker and the scratch database are cleaned up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    mix = make_mix(args.seed, args.waves, args.jobs_per_wave)
    started = time.monotonic()
    stage_rows: list[dict] = []  # read from dev's database; none against --url
    if args.url:
        base = args.url.rstrip("/")
        setting = f"against {base}: {describe(base)}"
        records = run_mix(base, mix, args.timeout, args.pause)
    else:
        env = {"ACESTEP_LM_MAX_DURATION": str(args.lm_max_duration)}
        with dev_deployment(workers=args.workers, env=env, postgres=args.postgres, checkpoint_dir=args.checkpoint_dir,
                            keep=args.keep, pin_cpus=args.pin_cpus) as deployment:
            base = deployment["url"]
            weights = "checkpoints " + str(args.checkpoint_dir) if args.checkpoint_dir else "tiny random checkpoints"
            setting = (f"dev ({weights}, ACESTEP_LM_MAX_DURATION={args.lm_max_duration}) + {args.workers - 1} worker"
                       f"{' (a CPU and one torch thread each)' if args.pin_cpus else ''}: "
                       f"{describe(base)}")
            records = run_mix(base, mix, args.timeout, args.pause)
            stage_rows = recorded_stages(deployment["database_url"], records)
            print_stages(stage_rows, "gpu" if args.checkpoint_dir else "cpu-tiny")  # dev's choice (cli.py)
    wall = time.monotonic() - started
    rows = job_rows(records)
    summary = summarise(rows)
    header = (f"{len(rows)} jobs in {len(mix)} waves (seed {args.seed}), {setting}, {platform.machine()}, "
              f"wall {wall:.0f} s, load average at the end {os.getloadavg()[0]:.1f}")
    print_report(rows, summary, header)
    if args.out:
        args.out.write_text(json.dumps({"setting": header, "argv": sys.argv[1:], "summary": summary,
                                        "jobs": rows, "stage_rows": stage_rows, "plans": [[asdict(p) for p in w] for w in mix]}, indent=1))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
