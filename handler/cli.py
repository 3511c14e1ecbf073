"""`acestep-serverless`: the command line of the whole system."""

import argparse
import logging
import signal
import sys
import threading

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


def cmd_dev(args: argparse.Namespace) -> int:
    """The database half of the all-in-one dev system: embedded Postgres, migrated, until Ctrl-C."""
    from migrations import upgrade

    settings = _settings()
    url = _database_url(settings)
    upgrade(url)
    print(f"job store ready: {url}", flush=True)
    print("the HTTP API and the worker are not part of this build yet; Ctrl-C stops the database", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep-serverless", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help=cmd_migrate.__doc__)
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=cmd_migrate)
    dev = sub.add_parser("dev", help=cmd_dev.__doc__)
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
