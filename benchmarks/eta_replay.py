"""The cost model replayed on recorded runs: each job priced as the API priced it at its first poll.

Reads the --out files of `eta_accuracy.py` (their `stage_rows`: every job's features, recorded stage
seconds and run time, its first poll and its finish, all from dev's database). For every succeeded
job after the warm-up wave: the cost model fitted (from dev's prior) on the jobs that had finished by
the job's first poll, its price then (a duration the LM chooses priced at what it chose lately, as at
submit) against its recorded run (claim to finish). This is the part of eta_seconds that pricing
decides, without the queue and the scheduling around it, so a change to the cost model can be
compared on the same recorded jobs, many runs at once, in a second.

    python benchmarks/eta_replay.py eta-1.json eta-2.json eta-3.json [--skip-cold] [--warm-up 6]

--skip-cold leaves out of the fit the runs the worker marked cold (the first run of their kind of
work on their pipeline process), to see what weighting them down would change.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handler.http.cost_model import MIN_JOB_SECONDS, PRIORS, Work, fit_cost_model  # noqa: E402
from pipeline.contract import SOURCE_TASK_TYPES  # noqa: E402


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def priced_at_poll(rows: list[dict], prior: str, skip_cold: bool = False) -> list[tuple[dict, dict[str, float]]]:
    """Every succeeded job (in the order of its first poll) with each stage's price then: the cost model
    fitted, as the API fits it from `prior`, on the jobs that had finished by that poll (newest first,
    as JobStore.cost_samples reads them), with a duration the LM chooses priced as at submit."""
    done = sorted((r for r in rows if r["status"] == "succeeded" and r["timings"]), key=lambda r: r["poll"])
    out = []
    for row in done:
        samples = sorted((r for r in done if r["finished"] < row["poll"]
                          and not (skip_cold and r["timings"].get("cold"))), key=lambda r: -r["finished"])
        model = fit_cost_model(samples, PRIORS[prior]).of(row["model"] or "")
        chosen_later = not row["duration_given"] and row["task_type"] not in SOURCE_TASK_TYPES  # a source's length is known
        out.append((row, model.stage_seconds(Work.of(row | {"audio_seconds": None}) if chosen_later else Work.of(row))))
    return out


def replay(rows: list[dict], warm_up: int, prior: str, skip_cold: bool) -> list[dict]:
    """Per scored job: recorded and priced seconds, in total and per stage."""
    return [{"kind": row["kind"], "recorded": row["seconds"], "priced": max(MIN_JOB_SECONDS, sum(priced.values())),
             "stages": {stage: (row["timings"]["stages"].get(stage, 0.0), p) for stage, p in priced.items()}}
            for row, priced in priced_at_poll(rows, prior, skip_cold)[warm_up:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="eta_accuracy.py --out files")
    parser.add_argument("--warm-up", type=int, default=6, help="first jobs (by first poll) left unscored (default 6)")
    parser.add_argument("--prior", default="cpu-tiny", choices=sorted(PRIORS))
    parser.add_argument("--skip-cold", action="store_true", help="fit without the runs marked cold")
    args = parser.parse_args()
    jobs = []
    for path in args.runs:
        rows = json.loads(path.read_text()).get("stage_rows")
        if not rows:
            parser.error(f"{path} has no stage_rows (written by eta_accuracy.py --out against dev)")
        jobs += replay(rows, args.warm_up, args.prior, args.skip_cold)
    errors = [abs(j["priced"] - j["recorded"]) / j["recorded"] for j in jobs]
    signed = [(j["priced"] - j["recorded"]) / j["recorded"] for j in jobs]
    print(f"{len(jobs)} scored jobs from {len(args.runs)} runs{', cold runs left out of the fit' if args.skip_cold else ''}")
    print(f"price vs recorded run: |error| median {100 * statistics.median(errors):.1f} %, p90 {100 * p90(errors):.1f} %,"
          f" signed median {100 * statistics.median(signed):+.1f} %")
    stages: dict[str, list[float]] = {}
    for job in jobs:
        for stage, (recorded, priced) in job["stages"].items():
            totals = stages.setdefault(stage, [0.0, 0.0])
            totals[0] += recorded
            totals[1] += priced
    print("per stage, recorded / priced seconds summed: "
          + ", ".join(f"{stage} {r:.0f} / {p:.0f}" for stage, (r, p) in stages.items() if r >= 0.5 or p >= 0.5))


if __name__ == "__main__":
    main()
