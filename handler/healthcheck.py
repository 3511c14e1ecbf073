"""`python -m handler.healthcheck [--weights-only | --http]`: is this worker (or HTTP) container healthy?

Exit 0 when it is; exit 1 with a one-line reason on stdout when it is not. Healthy means:

* the checkpoint directory (ACESTEP_CHECKPOINT_DIR) holds a loadable layout: `pipeline.checkpoints.discover`
  finds every component, the DiT this worker serves (ACESTEP_DIT_MODEL) and every LM it is told to load
  (ACESTEP_LM_MODELS, ACESTEP_LM_MODEL). Skipped when ACESTEP_PIPELINE names another pipeline than the
  real one (a test or fake pipeline needs no checkpoints);
* unless `--weights-only`: the worker's heartbeat file was touched within HEARTBEAT_STALE_SECONDS. The
  worker calls `beat()` from its heartbeat loop; before the first beat (while the models load) the file
  does not exist and the check fails, which is why the image's HEALTHCHECK has a `--start-period` long
  enough for a model load (Docker does not count failures inside it).

`--http` is the HTTP image's check instead (infra/docker/http.Dockerfile): GET /health on this
container's own port (ACESTEP_PORT) answers 200 within the timeout. Whether a GPU worker is live is in
that answer's body, not in the HTTP container's health: a queue without workers is a normal state.

The container entry point runs the `--weights-only` form before it starts a worker, so a worker without
weights stops at once with the reason instead of starting and failing every job. Light on purpose: it
imports neither torch nor the database layer (it runs every 30 s)."""

import argparse
import os
import sys
import time
from pathlib import Path

HEALTH_FILE_ENV = "ACESTEP_HEALTH_FILE"
DEFAULT_HEALTH_FILE = Path("/tmp/acestep-worker.alive")
# The worker beats every ACESTEP_HEARTBEAT_SECONDS (10 s by default); several missed beats in a row,
# not one slow one, make it unhealthy.
HEARTBEAT_STALE_SECONDS = 120.0


class Unhealthy(Exception):
    """Why this container is not healthy (one line)."""


def health_file() -> Path:
    """The heartbeat file: ACESTEP_HEALTH_FILE, else /tmp/acestep-worker.alive."""
    return Path(os.environ.get(HEALTH_FILE_ENV) or DEFAULT_HEALTH_FILE)


def beat(path: Path | None = None) -> None:
    """Touch the heartbeat file (create it, or move its modification time to now). Never raises: a
    health file that cannot be written must not stop a worker; the health check then reports it."""
    try:
        (Path(path) if path is not None else health_file()).touch()
    except Exception:  # noqa: BLE001 - by contract, whatever happens
        pass


def _one_line(text: object) -> str:
    """A multi-line message (discover() lists every missing piece on a line of its own) on one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def _variable(loc: tuple) -> str:
    """The ACESTEP_* variable a settings error is about (as `acestep-serverless` names it)."""
    name = "_".join(str(p) for p in loc).upper()
    if not name:
        return "ACESTEP_SETTINGS"
    return name if name.startswith("ACESTEP_") else f"ACESTEP_{name}"


def _settings():
    from pydantic import ValidationError

    from handler.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise Unhealthy(f"bad configuration: {problems}") from None


def check_weights(settings) -> str:
    """What the checkpoint directory holds, or Unhealthy saying what is missing."""
    from handler.settings import DEFAULT_PIPELINE
    from pipeline.checkpoints import CheckpointError, discover

    if settings.pipeline != DEFAULT_PIPELINE:
        return f"weights not checked: ACESTEP_PIPELINE is {settings.pipeline}"
    if settings.checkpoint_dir is None:
        raise Unhealthy("ACESTEP_CHECKPOINT_DIR is not set: the worker has no checkpoints to load")
    root = Path(settings.checkpoint_dir)
    try:
        found = discover(root)
        found.dit(settings.dit_model)
        options = settings.pipeline_options()
        for name in dict.fromkeys((*options.lm_models, *([options.lm_model] if options.lm_model else []))):
            found.lm(name)
    except CheckpointError as exc:
        raise Unhealthy(f"no usable checkpoints in {root}: {_one_line(exc)}") from None
    except OSError as exc:  # an unreadable volume
        raise Unhealthy(f"cannot read the checkpoints in {root}: {exc}") from None
    lms = ", ".join(found.lms) or "none"
    return f"checkpoints in {root}: DiT {settings.dit_model}; LM {lms}"


def check_heartbeat(path: Path | None = None, *, now: float | None = None,
                    stale_seconds: float = HEARTBEAT_STALE_SECONDS) -> str:
    target = path if path is not None else health_file()
    try:
        age = (time.time() if now is None else now) - target.stat().st_mtime
    except FileNotFoundError:
        raise Unhealthy(f"no worker heartbeat yet ({target} does not exist): the worker is starting or not running") from None
    except OSError as exc:
        raise Unhealthy(f"cannot read the worker heartbeat {target}: {exc}") from None
    if age > stale_seconds:
        raise Unhealthy(f"worker heartbeat is stale: {target} last touched {age:.0f} s ago (limit {stale_seconds:.0f} s)")
    return f"worker heartbeat {age:.0f} s ago"


def check(*, weights_only: bool = False) -> str:
    """A one-line summary when healthy; Unhealthy otherwise."""
    parts = [check_weights(_settings())]
    if not weights_only:
        parts.append(check_heartbeat())
    return "healthy: " + "; ".join(parts)


def check_http(timeout: float = 4.0) -> str:
    """The API in this container answers GET /health (on 127.0.0.1:ACESTEP_PORT)."""
    import json
    import urllib.error
    import urllib.request

    port = os.environ.get("ACESTEP_PORT") or "8001"
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - a fixed local URL
            body = json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"{url} answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise Unhealthy(f"{url} did not answer: {_one_line(exc)}") from None
    data = body.get("data") if isinstance(body.get("data"), dict) else body
    return f"healthy: {url} answered 200 ({data.get('status', 'ok')})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.healthcheck", description=__doc__.split("\n\n")[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--weights-only", action="store_true", help="check the checkpoints only, not the worker heartbeat")
    kind.add_argument("--http", action="store_true", help="the HTTP container: GET /health on ACESTEP_PORT answers 200")
    args = parser.parse_args(argv)
    try:
        print(check_http() if args.http else check(weights_only=args.weights_only))
    except Unhealthy as exc:
        print(f"unhealthy: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - a health check answers, it does not crash
        print(f"unhealthy: the health check failed: {type(exc).__name__}: {_one_line(exc)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
