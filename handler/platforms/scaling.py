"""When to start GPU drains on a scale-to-zero platform (Modal's kicker, the RunPod trigger): from
what the job store says waits (queued jobs, and running jobs whose worker stopped heartbeating: a drain
rescues and reruns those) and the drains already under way."""

from dataclasses import dataclass
from datetime import datetime

from db import JobStore, WorkerState

SETUP_BACKOFF_SECONDS = 900  # after a GPU worker failed to load its models, no drain starts for this long
WORKER_STALE_SECONDS = 30.0  # a worker row without a heartbeat this long belongs to no live drain


@dataclass(frozen=True)
class Fleet:
    """What a trigger knows: the work waiting and the drains that will take it."""

    queued: int  # jobs waiting to be claimed
    expired_leases: int  # running jobs whose worker stopped heartbeating
    draining: int  # drains under way (live worker rows, or the platform's count if it says more)
    pending: int  # drains asked for that no container has taken yet (the platform's backlog)
    setup_failed_at: datetime | None = None  # the latest SETUP_FAILED worker within SETUP_BACKOFF_SECONDS


@dataclass(frozen=True)
class KickDecision:
    spawn: int
    reason: str


def read_fleet(store: JobStore, *, running: int = 0, backlog: int = 0, now: datetime | None = None,
               stale_seconds: float = WORKER_STALE_SECONDS,
               setup_backoff_seconds: float = SETUP_BACKOFF_SECONDS) -> Fleet:
    """The fleet as the job store sees it, with what the platform reports (`running`: drains running,
    model loads included; `backlog`: drains waiting for a container)."""
    stats = store.stats(now=now)
    live = [w for w in store.workers(stale_seconds=stale_seconds, now=now)
            if w["alive"] and w["state"] in (WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY)]
    failed = [w["heartbeat_at"] for w in store.workers(stale_seconds=setup_backoff_seconds, now=now)
              if w["alive"] and w["state"] == WorkerState.SETUP_FAILED]
    return Fleet(
        queued=int(stats["queue_depth"]), expired_leases=int(stats["expired_leases"]),
        draining=max(len(live), running), pending=backlog, setup_failed_at=max(failed, default=None),
    )


def kick_decision(fleet: Fleet, *, cap: int, setup_backoff_seconds: float = SETUP_BACKOFF_SECONDS) -> KickDecision:
    """How many drains to start: one per waiting job, never beyond `cap` drains at once (running and
    pending counted), and none while a recent setup failure says the GPUs cannot load the models."""
    work = fleet.queued + fleet.expired_leases
    if work == 0:
        return KickDecision(0, "no work")
    if fleet.setup_failed_at is not None:
        return KickDecision(0, f"a GPU worker failed to load the models at {fleet.setup_failed_at:%Y-%m-%d %H:%M:%S}; "
                               f"no drain starts until {setup_backoff_seconds:.0f} s after that (weights missing?)")
    in_flight = fleet.draining + fleet.pending
    spawn = max(0, min(work, cap) - in_flight)
    return KickDecision(spawn, f"{fleet.queued} queued + {fleet.expired_leases} expired leases; "
                               f"{in_flight} drains in flight of {cap}")
