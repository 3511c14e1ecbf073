"""`acestep-serverless`: the command line of the whole system."""

import argparse
import logging
import os
import signal
import subprocess
import sys

from pydantic import ValidationError

from db.server import start_embedded
from handler.settings import Settings

log = logging.getLogger("acestep_serverless")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"ACESTEP_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}" for err in exc.errors()
        )
        raise SystemExit(f"bad configuration: {problems}") from None


def _database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return start_embedded(settings.data_dir.resolve() / "postgres")


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply every migration (alembic upgrade head)."""
    from migrations import upgrade

    settings = _settings()
    if not settings.database_url:
        raise SystemExit("ACESTEP_DATABASE_URL is not set: migrate needs the database to upgrade")
    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def _serve_http(settings: Settings, database_url: str) -> None:
    import uvicorn

    from handler.http.app import create_app
    from handler.http.services import build_services

    services = build_services(settings, database_url)
    if not services.auth.open_mode and settings.env == "production" and services.store.active_api_keys() == 0:
        raise SystemExit(
            "no API keys exist and ACESTEP_ENV=production: create one with `acestep-serverless create-key NAME`, "
            "or set ACESTEP_ALLOW_OPEN=true to serve without keys"
        )
    app = create_app(services)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def cmd_serve(args: argparse.Namespace) -> int:
    """The HTTP function alone, on ACESTEP_HOST:ACESTEP_PORT."""
    settings = _settings()
    if not settings.database_url:
        raise SystemExit("ACESTEP_DATABASE_URL is not set: serve needs the job database")
    _serve_http(settings, settings.database_url)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded Postgres (or ACESTEP_DATABASE_URL), migrated, local storage, the HTTP API and one worker."""
    from migrations import upgrade

    settings = _settings()
    url = _database_url(settings)
    upgrade(url)
    print(f"job store ready: {url}", flush=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "worker"],
        env={**os.environ, "ACESTEP_DATABASE_URL": url, "ACESTEP_DATA_DIR": str(settings.data_dir.resolve())},
    )
    try:
        _serve_http(settings, url)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # soft stop: a running job finishes or goes back to the queue
            worker.wait(timeout=settings.shutdown_grace_seconds + 30)
    if worker.returncode not in (0, None):
        print(f"the worker exited with code {worker.returncode} (see its log above); jobs stayed queued", flush=True)
    print("stopped", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The GPU worker: load the models once, then claim and run jobs until stopped."""
    from handler.worker.worker import worker_from_settings

    settings = _settings()
    if not settings.database_url:
        raise SystemExit("ACESTEP_DATABASE_URL is not set: the worker needs the job database")
    overrides = {"batch_jobs": args.batch_jobs} if args.batch_jobs else {}
    worker = worker_from_settings(
        settings, concurrency=args.concurrency, once=args.once, max_jobs=args.max_jobs,
        exit_when_idle=args.exit_when_idle, **overrides,
    )
    worker.install_signal_handlers()
    return worker.run()


def cmd_create_key(args: argparse.Namespace) -> int:
    """Create an API key; it is printed once and stored only as a hash."""
    from db import JobStore, make_engine
    from handler.http.auth import create_api_key
    from handler.http.services import secret_key
    from handler.webhooks import owner_webhook_secret

    settings = _settings()
    if not settings.database_url:
        raise SystemExit("ACESTEP_DATABASE_URL is not set: create-key needs the job database")
    store = JobStore(make_engine(settings.database_url, pool_size=1))
    key_id, key = create_api_key(store, args.name, max_queued=args.max_queued)
    print(f"key id:         {key_id}")
    print(f"API key:        {key}   (shown once; send as Authorization: Bearer <key>)")
    print(f"webhook secret: {owner_webhook_secret(secret_key(settings), key_id)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep-serverless", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help=cmd_migrate.__doc__)
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=cmd_migrate)
    dev = sub.add_parser("dev", help=cmd_dev.__doc__)
    dev.set_defaults(func=cmd_dev)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help=cmd_worker.__doc__)
    worker.add_argument("--once", action="store_true", help="run what is queued now, then exit")
    worker.add_argument("--exit-when-idle", type=float, metavar="SECONDS", help="exit after this long with nothing to do")
    worker.add_argument("--max-jobs", type=int, metavar="N", help="exit after claiming N jobs")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N", help="jobs at once (one pipeline process each)")
    worker.add_argument("--batch-jobs", type=int, metavar="N", help="compatible jobs run as one GPU batch (default 1)")
    worker.set_defaults(func=cmd_worker)
    create_key = sub.add_parser("create-key", help=cmd_create_key.__doc__)
    create_key.add_argument("name")
    create_key.add_argument("--max-queued", type=int, default=None)
    create_key.set_defaults(func=cmd_create_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("alembic.runtime.plugins", "pgserver"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
