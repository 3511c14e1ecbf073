"""`acestep-serverless`: the command line of the whole system."""

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from pydantic import ValidationError

from db.server import start_embedded
from handler.settings import DEFAULT_PIPELINE, Settings

log = logging.getLogger("acestep_serverless")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SystemExit(f"bad configuration: {problems}") from None


def _variable(loc: tuple) -> str:
    """The ACESTEP_* variable a settings error is about (an alias is already the variable's name)."""
    name = "_".join(str(p) for p in loc).upper()
    if not name:
        return "ACESTEP_SETTINGS"
    return name if name.startswith("ACESTEP_") else f"ACESTEP_{name}"


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
    env = {**os.environ, "ACESTEP_DATABASE_URL": url, "ACESTEP_DATA_DIR": str(settings.data_dir.resolve())}
    if settings.pipeline == DEFAULT_PIPELINE and settings.checkpoint_dir is None:
        env["ACESTEP_CHECKPOINT_DIR"] = str(_tiny_checkpoints(settings.data_dir.resolve() / "tiny-checkpoints"))
    worker = subprocess.Popen([sys.executable, "-m", "handler.cli", "worker"], env=env)
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


def _tiny_checkpoints(folder: Path) -> Path:
    """Tiny random checkpoints for `dev` without ACESTEP_CHECKPOINT_DIR, built once, with a loud warning."""
    banner = "=" * 78
    print(f"{banner}\nWARNING: ACESTEP_CHECKPOINT_DIR is not set, so the worker uses TINY RANDOM checkpoints in\n"
          f"  {folder}\nThe API works end to end, but THE AUDIO IS NOISE. For music: acestep-serverless\n"
          f"download-models DIR, then ACESTEP_CHECKPOINT_DIR=DIR.\n{banner}", flush=True)
    marker = folder / ".complete"
    if not marker.exists():
        from pipeline.tiny import build_tiny_checkpoints

        print("building the tiny checkpoints (first run only)...", flush=True)
        build_tiny_checkpoints(folder)
        marker.touch()
    return folder


def cmd_make_tiny_checkpoints(args: argparse.Namespace) -> int:
    """Tiny random checkpoints in the real layout (for tests and trying the API; the audio is noise)."""
    from pipeline.tiny import build_tiny_checkpoints

    root = build_tiny_checkpoints(Path(args.dir), seed=args.seed, with_lm=not args.no_lm)
    print(f"tiny random checkpoints in {root} (the audio they make is noise)")
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


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job to the API, show its place in the queue and progress, download the audio."""
    import json

    from handler.client import ClientError, submit_and_wait

    settings = _settings()
    fields: dict = {"caption": args.caption, "lyrics": args.lyrics, "audio_format": args.format, "task_type": args.task}
    if args.duration is not None:
        fields["audio_duration"] = args.duration
    if args.thinking:
        fields["thinking"] = True
    for item in args.param:
        name, _, raw = item.partition("=")
        try:
            fields[name] = json.loads(raw)
        except json.JSONDecodeError:
            fields[name] = raw
    url = args.url or settings.public_url or f"http://{settings.host}:{settings.port}"
    try:
        paths = submit_and_wait(url, fields, out_dir=Path(args.out), api_key=args.key, src_audio=args.src)
    except (ClientError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def cmd_download_models(args: argparse.Namespace) -> int:
    """Fetch the real checkpoints from the Hugging Face hub, then check their layout."""
    from pipeline.download import download_models

    settings = _settings()
    target = Path(args.dir) if args.dir else (settings.checkpoint_dir or Path("checkpoints"))
    found = download_models(target, args.with_models)
    print(f"checkpoints ready in {found.root}: DiT {', '.join(found.dits)}; LM {', '.join(found.lms) or 'none'}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    """Create an API key; it is printed once and stored only as a hash."""
    from db import JobStore, make_engine
    from handler.http.auth import create_api_key
    from handler.backends import secret_key
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
    submit = sub.add_parser("submit", help=cmd_submit.__doc__)
    submit.add_argument("--caption", default="")
    submit.add_argument("--lyrics", default="")
    submit.add_argument("--duration", type=float, help="seconds of audio (10-600)")
    submit.add_argument("--thinking", action="store_true", help="let the 5 Hz LM write the audio codes")
    submit.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac"])
    submit.add_argument("--task", default="text2music", choices=["text2music", "cover", "repaint"])
    submit.add_argument("--src", type=Path, help="source audio to upload (cover, repaint)")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="any other field of the API")
    submit.add_argument("--url", help="the API (default: ACESTEP_PUBLIC_URL or http://ACESTEP_HOST:ACESTEP_PORT)")
    submit.add_argument("--key", help="API key, if the server wants one")
    submit.add_argument("--out", default=".", help="where the audio goes")
    submit.set_defaults(func=cmd_submit)
    download = sub.add_parser("download-models", help=cmd_download_models.__doc__)
    download.add_argument("dir", nargs="?", help="default: ACESTEP_CHECKPOINT_DIR or ./checkpoints")
    download.add_argument("--with", dest="with_models", action="append", default=[], metavar="NAME",
                          help="also an extra model, e.g. acestep-5Hz-lm-4B or acestep-v15-base")
    download.set_defaults(func=cmd_download_models)
    tiny = sub.add_parser("make-tiny-checkpoints", help=cmd_make_tiny_checkpoints.__doc__)
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-lm", action="store_true", help="leave out the 5 Hz LM")
    tiny.set_defaults(func=cmd_make_tiny_checkpoints)
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
