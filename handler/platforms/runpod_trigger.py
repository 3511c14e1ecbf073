"""Starts RunPod drain jobs when work waits in the job database: queued jobs, and running jobs whose
worker stopped heartbeating (a killed drain leaves those; the next drain rescues and reruns them).

    python -m handler.platforms.runpod_trigger [--once] [--every 15]

Beside the HTTP function, as a cron job (`--once`), or any small always-on process. It needs the
job database (ACESTEP_DATABASE_URL) and ACESTEP_RUNPOD_ENDPOINT_ID, ACESTEP_RUNPOD_API_KEY; each round it
reads the endpoint's health (jobs in queue and in progress count as drains in flight), decides with
handler/platforms/scaling.py (one drain per waiting job, at most ACESTEP_RUNPOD_MAX_DRAINS in flight,
none for 15 minutes after a worker failed to load its models) and POSTs that many
`{"input": {"mode": "drain", "time_budget_seconds": ACESTEP_RUNPOD_DRAIN_BUDGET_SECONDS}}` to /run.

Clients that submit through RunPod itself (native mode) need no trigger: RunPod scales on its own queue.
"""

import argparse
import logging
import time

import httpx

from db import JobStore, StoreError
from handler.backends import build_store
from handler.logs import configure_logging
from handler.platforms.scaling import KickDecision, kick_decision, read_fleet
from handler.settings import Settings

log = logging.getLogger(__name__)


class RunpodError(Exception):
    """RunPod's endpoint API refused or failed a call."""


class RunpodEndpoint:
    """The two calls of RunPod's endpoint API the trigger makes."""

    def __init__(self, endpoint_id: str, api_key: str, *, base_url: str = "https://api.runpod.ai/v2",
                 client: httpx.Client | None = None):
        self._url = f"{base_url.rstrip('/')}/{endpoint_id}"
        self._client = client or httpx.Client(timeout=30)
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def in_flight(self) -> tuple[int, int]:
        """(jobs in progress, jobs in RunPod's queue) on the endpoint."""
        jobs = self._call("GET", "/health").get("jobs") or {}
        return int(jobs.get("inProgress", 0)), int(jobs.get("inQueue", 0))

    def start_drain(self, budget_seconds: float) -> str:
        """Queue one drain job; its RunPod id."""
        answer = self._call("POST", "/run", json={"input": {"mode": "drain", "time_budget_seconds": budget_seconds}})
        return str(answer.get("id", ""))

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._client.request(method, self._url + path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise RunpodError(f"{method} {path}: {exc}") from exc
        if response.status_code >= 400:
            raise RunpodError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")
        return response.json()


def trigger_round(store: JobStore, endpoint: RunpodEndpoint, *, cap: int, budget_seconds: float) -> KickDecision:
    """One look at the queue and the endpoint; starts the drains the decision asks for."""
    running, queued = endpoint.in_flight()
    decision = kick_decision(read_fleet(store, running=running, backlog=queued), cap=cap)
    started = [endpoint.start_drain(budget_seconds) for _ in range(decision.spawn)]
    if started:
        log.info("started %d RunPod drains (%s)", len(started), decision.reason,
                 extra={"action": "runpod_trigger", "runpod_jobs": started})
    return decision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.platforms.runpod_trigger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="one round, then exit (for cron)")
    parser.add_argument("--every", type=float, default=15.0, metavar="SECONDS", help="seconds between rounds")
    args = parser.parse_args(argv)
    configure_logging()
    settings = Settings()
    missing = [name for name, value in (("ACESTEP_DATABASE_URL", settings.database_url),
                                        ("ACESTEP_RUNPOD_ENDPOINT_ID", settings.runpod_endpoint_id),
                                        ("ACESTEP_RUNPOD_API_KEY", settings.runpod_api_key)) if not value]
    if missing:
        parser.error(f"set {', '.join(missing)}")
    store = build_store(settings, settings.database_url)
    endpoint = RunpodEndpoint(settings.runpod_endpoint_id, settings.runpod_api_key, base_url=settings.runpod_api_url)
    while True:
        try:
            decision = trigger_round(store, endpoint, cap=settings.runpod_max_drains,
                                     budget_seconds=settings.runpod_drain_budget_seconds)
            print(f"{decision.spawn} drains started: {decision.reason}", flush=True)
        except (RunpodError, StoreError) as exc:
            log.error("trigger round failed: %s", exc, extra={"action": "runpod_trigger_failed"})
            if args.once:
                return 1
        if args.once:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    raise SystemExit(main())
