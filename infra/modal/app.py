"""The Modal deployment: the HTTP function as an ASGI web endpoint, a GPU class that drains the job
queue and scales to zero, a kicker that starts drains when work waits, a maintenance round (lease
rescue, webhooks, retention) that needs no API container, and one-off functions to fill the weights
volume, migrate the database and make API keys.

    modal deploy infra/modal/app.py      (from any directory; the secret "acestep" holds the ACESTEP_* variables)

Steps from nothing to a first song, the costs and the knobs: infra/modal/README.md. The settings of
each function below are the ones its table lists (tests/unit/test_modal_app.py compares them).

What the containers get: the four packages of the project with every file of theirs (SQL, migrations,
templates, JSON; not only the .py files), added at container start at /root where Python imports them
from, over an image whose every package is pinned (requirements-*.lock, written by lock.py from
pyproject.toml). The API image has no torch: the HTTP function, the kicker and the maintenance round
never load a model. Nothing here reads the current directory: every path comes from this file's place.

The decisions (how many drains to start, the drain's time budget, one maintenance round) are plain
functions of what the database and Modal report, so the tests run them without a Modal account.
"""

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import modal

log = logging.getLogger("acestep.modal")

# --- what the deployment is made of ------------------------------------------------------------

HERE = Path(__file__).resolve().parent
# The repository root, where this file sits at infra/modal/app.py. In a container this file is
# /root/app.py and the images are not built again there, so the paths only need to exist locally.
ROOT = HERE.parents[1] if len(HERE.parents) > 1 else HERE
PACKAGES = ("handler", "db", "pipeline", "migrations")  # pyproject's [tool.setuptools.packages.find]
REMOTE_ROOT = "/root"  # on the containers' sys.path (Modal runs the app from there)
PYTHON_VERSION = "3.11"

SECRET_NAME = "acestep"
SECRET_REQUIRED_KEYS = ["ACESTEP_DATABASE_URL", "ACESTEP_STORAGE_URL", "ACESTEP_SECRET_KEY", "ACESTEP_ENV"]
VOLUME_NAME = "acestep-checkpoints"
CHECKPOINTS = "/checkpoints"  # where the weights volume is mounted (ACESTEP_CHECKPOINT_DIR of the GPU class)

# --- the knobs (infra/modal/README.md says why each is what it is) -----------------------------

API_CPU, API_MEMORY_MB = 1.0, 1024
API_MIN_CONTAINERS = 0  # scale to zero: nothing is paid while no one calls
API_MAX_CONTAINERS = 4  # x (ACESTEP_DB_POOL_SIZE 5 + 5 overflow) database connections at most
API_SCALEDOWN_WINDOW = 600  # an idle API container costs ~$0.06/h; it spares pollers a cold start
API_TIMEOUT = 900  # above ACESTEP_SYNC_TIMEOUT_SECONDS (600): the synchronous LM routes wait that long
API_MAX_INPUTS = 100  # requests in flight per container: they wait on the database, not on the CPU
API_TARGET_INPUTS = 40  # where the autoscaler adds a container: the 40 threads that run the database calls

GPU = "H100"
GPU_MIN_CONTAINERS = 0
GPU_MAX_CONTAINERS = 2  # the most H100s billed at once (~$7.90/h); the kicker never asks for more
GPU_SCALEDOWN_WINDOW = 180  # an idle H100 after a drain: at most ~$0.20 that keeps the models loaded for the next job
GPU_TIMEOUT = 3600  # one drain invocation; its claiming stops in time for the last job to finish (drain_budget)

KICK_PERIOD_SECONDS = 30
MAINTENANCE_PERIOD_SECONDS = 60
SCHEDULED_SCALEDOWN_WINDOW = 2  # the scheduled functions' containers go as soon as a round is done: ~$1/month idle
MAINTENANCE_TIMEOUT = 300
WEBHOOK_ROUND_SECONDS = 40  # one maintenance round delivers webhooks for at most this long
SETUP_BACKOFF_SECONDS = 900  # after a GPU container failed to load its models, no drain starts for this long
WORKER_STALE_SECONDS = 30.0  # a worker row without a heartbeat this long belongs to no live drain
DRAIN_MARGIN_SECONDS = 60.0  # of GPU_TIMEOUT: for the drain's return after it handed its jobs back
DOWNLOAD_TIMEOUT = 3 * 3600

# --- images ------------------------------------------------------------------------------------


def _not_shipped(path: Path) -> bool:
    """What stays out of the containers: bytecode and dot files (editor and tool droppings)."""
    return path.suffix == ".pyc" or any(part == "__pycache__" or part.startswith(".") for part in path.parts)


def with_project(image: modal.Image) -> modal.Image:
    """`image` plus every file of the project's packages at /root/<package> (added at container start,
    so a code change needs no image build)."""
    for package in PACKAGES:
        image = image.add_local_dir(ROOT / package, f"{REMOTE_ROOT}/{package}", ignore=_not_shipped)
    return image


def base_image(lock: str) -> modal.Image:
    return (
        modal.Image.debian_slim(python_version=PYTHON_VERSION)
        .apt_install("libsndfile1")
        .pip_install_from_requirements(str(HERE / lock))
        .env({"PYTHONUNBUFFERED": "1"})
    )


api_image = with_project(base_image("requirements-api.lock"))
gpu_image = with_project(base_image("requirements-gpu.lock"))

secret = modal.Secret.from_name(SECRET_NAME, required_keys=SECRET_REQUIRED_KEYS)
checkpoints = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)

app = modal.App("acestep-serverless")

# --- the decisions, as plain functions -----------------------------------------------------------


def read_fleet(store, *, running_inputs: int = 0, backlog: int = 0, now: datetime | None = None):
    """The fleet as the job store sees it, with what Modal reports of the GPU class (`running_inputs`:
    drains running, model loads included; `backlog`: drains waiting for a container)."""
    from handler.platforms.scaling import read_fleet as fleet_of

    return fleet_of(store, running=running_inputs, backlog=backlog, now=now,
                    stale_seconds=WORKER_STALE_SECONDS, setup_backoff_seconds=SETUP_BACKOFF_SECONDS)


def kick_decision(fleet, *, cap: int = GPU_MAX_CONTAINERS):
    """How many drains to start (handler/platforms/scaling.py, shared with the RunPod trigger)."""
    from handler.platforms.scaling import kick_decision as decide

    return decide(fleet, cap=cap, setup_backoff_seconds=SETUP_BACKOFF_SECONDS)


def drain_budget(settings, timeout: float = GPU_TIMEOUT) -> float:
    """The drain's time budget: the invocation's timeout less a margin. The drain itself claims no job
    it cannot finish in time (by how long its jobs took) and hands back, unspent, any job still running
    near the end (handler/worker/worker.py), so Modal never kills a running job."""
    return max(60.0, timeout - DRAIN_MARGIN_SECONDS)


@dataclass
class MaintenanceSummary:
    rescued: int = 0
    pruned: int = 0
    webhooks_sent: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # task -> what it raised


def maintenance_round(services, *, webhook_seconds: float = WEBHOOK_ROUND_SECONDS,
                      now: datetime | None = None) -> MaintenanceSummary:
    """One round of the queue's maintenance with the HTTP function's own pieces (`build_services`):
    rescue expired leases, prune past retention, then deliver every due webhook for up to
    `webhook_seconds` (the dispatcher takes a batch at a time)."""
    from handler.maintenance import Maintenance

    maintenance = Maintenance(services.store, services.storage, retention_seconds=services.settings.retention_seconds,
                              webhooks=services.webhooks)
    outcome = maintenance.run_once(now=now)
    summary = MaintenanceSummary(rescued=len(outcome.rescued or []), pruned=outcome.pruned or 0,
                                 webhooks_sent=outcome.webhooks_sent or 0,
                                 failed={task: str(exc) for task, exc in outcome.failed.items()})
    deadline = time.monotonic() + webhook_seconds
    sent = summary.webhooks_sent
    while sent and "webhooks" not in summary.failed and time.monotonic() < deadline:
        try:
            sent = services.webhooks.run_once()
        except Exception as exc:  # noqa: BLE001 - the outbox keeps the work for the next round
            summary.failed["webhooks"] = str(exc)
            break
        summary.webhooks_sent += sent
    return summary


# --- the functions -------------------------------------------------------------------------------


@app.function(
    image=api_image, secrets=[secret], cpu=API_CPU, memory=API_MEMORY_MB, min_containers=API_MIN_CONTAINERS,
    max_containers=API_MAX_CONTAINERS, scaledown_window=API_SCALEDOWN_WINDOW, timeout=API_TIMEOUT,
)
@modal.concurrent(max_inputs=API_MAX_INPUTS, target_inputs=API_TARGET_INPUTS)
@modal.asgi_app()
def api():
    """The HTTP API. While a container runs it also rescues, prunes and delivers webhooks (its lifespan)."""
    from handler.http.app import app_from_environment

    return app_from_environment()


@app.cls(
    image=gpu_image, secrets=[secret], gpu=GPU, volumes={CHECKPOINTS: checkpoints}, timeout=GPU_TIMEOUT,
    min_containers=GPU_MIN_CONTAINERS, max_containers=GPU_MAX_CONTAINERS, scaledown_window=GPU_SCALEDOWN_WINDOW,
)
class GpuWorker:
    """One GPU container: its models stay loaded between drains until it has idled GPU_SCALEDOWN_WINDOW."""

    @modal.enter()
    def load(self) -> None:
        from handler.drain import Drainer

        self.settings = _settings(checkpoint_dir=CHECKPOINTS)
        self.drainer = Drainer(self.settings)

    @modal.method()
    def drain(self) -> dict:
        """Claim and run jobs until the queue is empty or the budget is spent; the summary."""
        summary = self.drainer.drain(drain_budget(self.settings))
        log.info("drain: %s", summary, extra={"action": "modal_drain", "summary": summary})
        if summary["setup_failed"]:
            # This container cannot serve: let it go instead of taking the next drain, and say so.
            # The worker row it left (SETUP_FAILED) holds the kicker off for SETUP_BACKOFF_SECONDS.
            import modal.experimental

            modal.experimental.stop_fetching_inputs()
            raise RuntimeError(
                f"worker {summary['worker_id']} could not load the models from the volume {VOLUME_NAME} at "
                f"{CHECKPOINTS}: fill it with `modal run infra/modal/app.py::download_weights`. No drain "
                f"starts for {SETUP_BACKOFF_SECONDS} s"
            )
        return summary

    @modal.exit()
    def unload(self) -> None:
        self.drainer.stop()  # a preempted container hands its running jobs back to the queue
        self.drainer.close()


def _drain_stats() -> tuple[int, int]:
    """(running inputs, backlog) of the GPU class as Modal counts them; (0, 0) when Modal cannot say
    (the job store's worker rows then stand alone)."""
    try:
        stats = GpuWorker().drain.get_current_stats()
        return int(stats.num_running_inputs), int(stats.backlog)
    except Exception as exc:  # noqa: BLE001 - a stats hiccup must not stop the kicker
        log.warning("no stats from Modal for the GPU class: %s", exc, extra={"action": "modal_stats_failed"})
        return 0, 0


def _settings(**overrides: Any):
    from handler.logs import configure_logging
    from handler.settings import Settings

    configure_logging()
    settings = Settings(**overrides)
    if not settings.database_url:
        raise RuntimeError(f"ACESTEP_DATABASE_URL is not set: add it to the Modal secret {SECRET_NAME!r}")
    return settings


@app.function(image=api_image, secrets=[secret], schedule=modal.Period(seconds=KICK_PERIOD_SECONDS), timeout=60,
              max_containers=1, scaledown_window=SCHEDULED_SCALEDOWN_WINDOW)
def kick() -> dict:
    """Start drains when jobs wait (queued, or running under an expired lease), up to GPU_MAX_CONTAINERS."""
    from handler.backends import build_store

    settings = _settings(db_pool_size=1)
    store = build_store(settings, settings.database_url)
    try:
        running, backlog = _drain_stats()
        fleet = read_fleet(store, running_inputs=running, backlog=backlog)
    finally:
        store.engine.dispose()
    decision = kick_decision(fleet)
    for _ in range(decision.spawn):
        GpuWorker().drain.spawn()
    log.info("kick: %d drains started (%s)", decision.spawn, decision.reason,
             extra={"action": "modal_kick", "spawned": decision.spawn})
    return {"spawned": decision.spawn, "reason": decision.reason}


@app.function(image=api_image, secrets=[secret], schedule=modal.Period(seconds=MAINTENANCE_PERIOD_SECONDS),
              timeout=MAINTENANCE_TIMEOUT, max_containers=1, scaledown_window=SCHEDULED_SCALEDOWN_WINDOW)
def maintenance() -> dict:
    """Rescue expired leases, deliver due webhooks, prune past retention: with the API scaled to zero too."""
    from handler.http.services import build_services

    settings = _settings(db_pool_size=2)
    services = build_services(settings, settings.database_url)
    try:
        summary = maintenance_round(services)
    finally:
        services.webhooks.close()
        services.store.engine.dispose()
    log.info("maintenance: %s", summary, extra={"action": "modal_maintenance"})
    if summary.failed:  # the round did what it could; a failed run is what alerts someone
        raise RuntimeError(f"maintenance tasks failed: {summary.failed}")
    return vars(summary)


@app.function(image=gpu_image, volumes={CHECKPOINTS: checkpoints}, timeout=DOWNLOAD_TIMEOUT, cpu=2.0, memory=4096)
def download_weights(extra: str = "") -> str:
    """Fill the weights volume from the Hugging Face hub (resumable); `extra`: comma-separated extra
    models, e.g. acestep-5Hz-lm-4B. Runs on a CPU container: no GPU is billed for the download."""
    from handler.logs import configure_logging
    from pipeline.download import download_models

    configure_logging()
    found = download_models(Path(CHECKPOINTS), [name.strip() for name in extra.split(",") if name.strip()])
    checkpoints.commit()
    message = f"checkpoints ready in volume {VOLUME_NAME}: DiT {', '.join(found.dits)}; LM {', '.join(found.lms) or 'none'}"
    log.info(message, extra={"action": "weights_ready"})
    return message


@app.function(image=api_image, secrets=[secret], timeout=600)
def migrate(revision: str = "head") -> None:
    """`acestep-serverless migrate` with the secret's ACESTEP_DATABASE_URL."""
    from handler.cli import main

    if main(["migrate", "--revision", revision]) != 0:
        raise RuntimeError("migrate failed")


@app.function(image=api_image, secrets=[secret], timeout=120)
def create_key(name: str) -> None:
    """`acestep-serverless create-key NAME` with the secret's database and ACESTEP_SECRET_KEY. The key
    and its webhook secret are printed once: into this run's output, which Modal keeps in the app's logs."""
    from handler.cli import main

    if main(["create-key", name]) != 0:
        raise RuntimeError("create-key failed")
