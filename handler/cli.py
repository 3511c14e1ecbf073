"""`acestep-serverless`: the command line of the whole system."""

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from pydantic import ValidationError

from db.server import start_embedded
from handler.logs import configure_logging, install_access_log_filter
from handler.settings import DEFAULT_PIPELINE, Settings

log = logging.getLogger("acestep_serverless")

# `dev` on tiny random checkpoints: the random LM would plan songs of any length up to 600 s.
TINY_LM_MAX_DURATION = 30


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
    pgdata = settings.data_dir.resolve() / "postgres"
    _forget_dead_handles(pgdata)
    return start_embedded(pgdata)


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the ids of processes that died without saying so (SIGKILL, a crash) from pgserver's list
    of the embedded server's users: it stops the server when its last user exits, and a dead id
    would keep it running for ever."""
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    pids = json.loads(handles.read_text() or "[]")
    alive = [pid for pid in pids if _process_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


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
    install_access_log_filter()
    # log_config=None: uvicorn's own lines and its access log go through the root logger, in the
    # format configure_logging chose (text or JSON), instead of handlers of uvicorn's own.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", log_config=None)


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

    # SIGTERM and SIGHUP stop dev as Ctrl-C does: the worker and the embedded Postgres stop with it
    # (uvicorn hands a signal it caught back to the handler found, which by default kills us outright).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # as under nohup
            signal.signal(sig, _exit_on_signal)
    settings = _dev_settings(_settings())
    url = _database_url(settings)
    upgrade(url)
    print(f"job store ready: {url}", flush=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "worker"], env=_dev_worker_env(settings, url, os.environ),
        process_group=0,  # a terminal's Ctrl-C reaches dev alone; dev gives the worker one soft stop
    )
    try:
        _serve_http(settings, url)
    finally:
        _stop_worker(worker, settings.shutdown_grace_seconds + 30)
    return 0


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _dev_settings(settings: Settings) -> Settings:
    """With tiny checkpoints, the ETA starts from what tiny jobs cost on a CPU (unless ACESTEP_ETA_PRIOR
    says), and the API accepts jobs for every tiny DiT the worker serves (unless ACESTEP_DIT_MODELS says)."""
    if not _uses_tiny_checkpoints(settings):
        return settings
    update = {}
    if "eta_prior" not in settings.model_fields_set:
        update["eta_prior"] = "cpu-tiny"
    if "dit_models" not in settings.model_fields_set:
        from pipeline.tiny import TINY_DITS

        update["dit_models"] = ",".join(TINY_DITS)
    return settings.model_copy(update=update)


def _uses_tiny_checkpoints(settings: Settings) -> bool:
    """`dev` without checkpoints builds tiny random ones."""
    return settings.pipeline == DEFAULT_PIPELINE and settings.checkpoint_dir is None


def _dev_worker_env(settings: Settings, database_url: str, environ: dict[str, str]) -> dict[str, str]:
    """The worker's environment under `dev`: dev's database and data dir; without ACESTEP_CHECKPOINT_DIR
    the tiny checkpoints, with the LM's songs kept short unless ACESTEP_LM_MAX_DURATION says otherwise, and
    every tiny DiT served (ACESTEP_DIT_MODELS) unless the user set that variable."""
    env = {**environ, "ACESTEP_DATABASE_URL": database_url, "ACESTEP_DATA_DIR": str(settings.data_dir.resolve())}
    if _uses_tiny_checkpoints(settings):
        lm_cap = settings.lm_max_duration if "lm_max_duration" in settings.model_fields_set else TINY_LM_MAX_DURATION
        env["ACESTEP_LM_MAX_DURATION"] = str(lm_cap)
        folder, dits = _tiny_checkpoints(settings.data_dir.resolve() / "tiny-checkpoints")
        env["ACESTEP_CHECKPOINT_DIR"] = str(folder)
        if "ACESTEP_DIT_MODELS" not in environ:  # every tiny DiT beside the default, unless the user chose
            env["ACESTEP_DIT_MODELS"] = ",".join(dits)
        served = dict.fromkeys([settings.dit_model, *_names(env.get("ACESTEP_DIT_MODELS", ""))])
        _tiny_banner(folder, lm_cap, list(served))
    return env


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _stop_worker(worker: subprocess.Popen, timeout: float) -> None:
    """Soft-stop dev's worker (a running job finishes or goes back to the queue) and wait for it; a
    second Ctrl-C or SIGTERM meanwhile is passed on, which makes the worker hurry (hard stop)."""

    def hurry(signum: int, frame) -> None:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, hurry)
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"the worker did not stop within {timeout:.0f} s; killed (its job goes back to the queue when its "
              "lease expires)", flush=True)
        worker.kill()
        worker.wait()
    if worker.returncode != 0:
        print(f"the worker exited with code {worker.returncode} (see its log above); jobs stayed queued", flush=True)
    print("stopped", flush=True)


TINY_MARKER = ".complete"  # written last by a finished build: {"dits": [the DiT folders it built]}


def _tiny_checkpoints(folder: Path) -> tuple[Path, tuple[str, ...]]:
    """Tiny random checkpoints for `dev` without ACESTEP_CHECKPOINT_DIR, built once, and the DiTs they hold.
    A set whose marker names no DiTs (built before the base and SFT DiTs were part of it) or lacks one of
    them is built again: the same seeds give the same weights, so only the missing folders change."""
    dits = _tiny_dits_built(folder)
    if dits is None:
        from pipeline.tiny import TINY_DITS, build_tiny_checkpoints

        print("building the tiny checkpoints (first run only)...", flush=True)
        (folder / TINY_MARKER).unlink(missing_ok=True)
        build_tiny_checkpoints(folder)
        (folder / TINY_MARKER).write_text(json.dumps({"dits": list(TINY_DITS)}) + "\n")
        dits = tuple(TINY_DITS)
    return folder, dits


def _tiny_dits_built(folder: Path) -> tuple[str, ...] | None:
    """The DiTs a finished tiny build in `folder` holds (read without importing torch), or None."""
    try:
        dits = json.loads((folder / TINY_MARKER).read_text())["dits"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or an older build's empty marker
        return None
    if not dits or not all(isinstance(name, str) and (folder / name / "model.safetensors").is_file() for name in dits):
        return None
    return tuple(dits)


def _tiny_banner(folder: Path, lm_max_duration: int, dits: list[str]) -> None:
    banner = "=" * 78
    print(f"{banner}\nWARNING: ACESTEP_CHECKPOINT_DIR is not set, so the worker uses TINY RANDOM checkpoints in\n"
          f"  {folder}\nThe API works end to end, but THE AUDIO IS NOISE. For music: acestep-serverless\n"
          f"download-models DIR, then ACESTEP_CHECKPOINT_DIR=DIR.\n"
          f"The worker serves the DiTs {', '.join(dits)} (the first is the default; ACESTEP_DIT_MODEL,\n"
          f"ACESTEP_DIT_MODELS).\n"
          f"Songs whose length the LM picks last at most {lm_max_duration} s (ACESTEP_LM_MAX_DURATION).\n{banner}",
          flush=True)


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
    if settings.worker_metrics_port is not None:  # Prometheus scrapes this worker's claims and runs
        try:
            worker.metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
        except OSError as exc:
            raise SystemExit(f"ACESTEP_WORKER_METRICS_PORT: cannot listen on {settings.worker_metrics_host}:"
                             f"{settings.worker_metrics_port}: {exc}") from None
    worker.install_signal_handlers()
    return worker.run()


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job to the API, show its place in the queue and progress, download the audio."""
    from handler.client import ClientError, param_value, submit_and_wait

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    settings = _settings()
    fields: dict = {"caption": args.caption, "lyrics": args.lyrics, "audio_format": args.format, "task_type": args.task}
    if args.duration is not None:
        fields["audio_duration"] = args.duration
    if args.thinking:
        fields["thinking"] = True
    for item in args.param:
        name, _, raw = item.partition("=")
        fields[name] = param_value(name, raw)
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
    for name, problems in sorted(found.incomplete.items()):  # left over from elsewhere, not fetched now
        print(f"incomplete, not loadable: {name} ({'; '.join(problems)})")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    """Create an API key; it is printed once and stored only as a hash."""
    from db import JobStore, make_engine
    from handler.http.auth import create_api_key
    from handler.backends import secret_key
    from handler.webhooks import owner_webhook_secret

    settings = _settings()
    secret_file = settings.data_dir / "secret-key"
    if not settings.secret_key and not secret_file.exists():
        raise SystemExit(
            f"ACESTEP_SECRET_KEY is not set and {secret_file} does not exist, so the webhook secret printed would "
            "not match the server's. Run create-key with the server's settings: its ACESTEP_SECRET_KEY, or (for "
            "`dev` and a server keeping its secret in its data dir) the same ACESTEP_DATA_DIR, after the server "
            "has started once"
        )
    dev_database = settings.data_dir / "postgres" / "PG_VERSION"
    if not settings.database_url and not dev_database.exists():
        raise SystemExit(f"ACESTEP_DATABASE_URL is not set and {settings.data_dir} holds no `dev` database: "
                         "create-key needs the job database")
    store = JobStore(make_engine(_database_url(settings), pool_size=1))
    key_id, key = create_api_key(store, args.name, max_queued=args.max_queued)
    print(f"key id:         {key_id}")
    print(f"API key:        {key}   (shown once; send as Authorization: Bearer <key>)")
    print(f"webhook secret: {owner_webhook_secret(secret_key(settings), key_id)}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    """Revoke an API key by its id (as create-key printed it): within seconds it is refused everywhere."""
    from db import JobStore, make_engine

    settings = _settings()
    dev_database = settings.data_dir / "postgres" / "PG_VERSION"
    if not settings.database_url and not dev_database.exists():
        raise SystemExit(f"ACESTEP_DATABASE_URL is not set and {settings.data_dir} holds no `dev` database: "
                         "revoke-key needs the job database")
    store = JobStore(make_engine(_database_url(settings), pool_size=1))
    if not store.revoke_api_key(args.key_id):
        print(f"no API key has the id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}; its jobs and files stay until retention removes them")
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
    from pipeline.download import SEPARATE_REPOS  # light: neither torch nor the hub client

    download.add_argument("--with", dest="with_models", action="append", default=[], metavar="NAME",
                          choices=sorted(SEPARATE_REPOS),
                          help=f"also an extra model (repeatable), one of: {', '.join(sorted(SEPARATE_REPOS))}")
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
    revoke_key = sub.add_parser("revoke-key", help=cmd_revoke_key.__doc__)
    revoke_key.add_argument("key_id")
    revoke_key.set_defaults(func=cmd_revoke_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
