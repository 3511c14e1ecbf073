"""Logging for every entry point: one format, the harmless third-party warnings kept out, and an
access log that shows what matters (submits, refusals, errors) rather than every poll, with the
query strings of signed links redacted.

Two formats (ACESTEP_LOG_FORMAT): `text`, one readable line, and `json`, one JSON object per line for
a log pipeline: `ts`, `level`, `logger`, `event`, `message`, then the record's fields. `auto` (the
default) is text on a terminal and json otherwise. A record's `event` is the stable name the code
gives it (`extra={"action": ...}`, or `"event"`); lines about a job carry `job_id`, `attempt` and
(from the worker) `worker_id`; uvicorn's access lines are event `http_request` with their method,
path (signed links redacted), status and client."""

import json
import logging
import os
import re
import sys
import warnings
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("auto", "json", "text")
ACCESS_LOGGER = "uvicorn.access"
REDACTED_QUERY = "?…"

# Routes whose query string is a credential: the reference's `/v1/audio?path=<signed token>` and
# local storage's `/v1/files/<key>?expires=..&signature=..`.
SIGNED_LINK_PREFIXES = ("/v1/audio", "/v1/files/")
CREDENTIAL_PARAM = re.compile(r"(^|&)[^=&]*(sig|signature|token|credential|x-amz-)[^=&]*=", re.IGNORECASE)

# What clients poll or download over and over: logged at DEBUG when it succeeds (2xx, 3xx).
QUIET_ROUTES = (
    ({"GET"}, re.compile(r"/v1/jobs(/[^/]+)?")),
    ({"POST"}, re.compile(r"/query_result")),
    ({"GET", "HEAD"}, re.compile(r"/health|/v1/stats|/metrics")),
    ({"GET", "HEAD"}, re.compile(r"/v1/audio|/v1/files/.+")),
)


# What every LogRecord has: the rest of a record's attributes are the `extra` fields a JSON line shows.
RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's coloured copy of its message
}
EVENT_FIELDS = ("event", "action")  # where call sites put a record's stable name
JOB_FIELDS = ("job_id", "attempt", "worker_id")  # first after the message, on the lines that have them


def log_format(setting: str | None = None, stream: TextIO | None = None) -> str:
    """"json" or "text": `setting` (else ACESTEP_LOG_FORMAT), with `auto` (or anything else: the
    settings refuse it with a clear message later) text when `stream` (stderr) is a terminal."""
    chosen = (setting if setting is not None else os.environ.get("ACESTEP_LOG_FORMAT", "auto")).strip().lower()
    if chosen in ("json", "text"):
        return chosen
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or not a file
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (UTC, ISO 8601, ms), level, logger, event (the
    record's `event` or `action`, or `http_request` for an access line; absent when the record has
    none), message, then job_id, attempt, worker_id and every other field the record carries;
    `exc_info` / `stack_info` hold a traceback. Values JSON cannot hold are written as str()."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = {key: value for key, value in vars(record).items() if key not in RECORD_ATTRIBUTES}
        event = next((fields.pop(key) for key in EVENT_FIELDS if fields.get(key) is not None), None)
        for key in EVENT_FIELDS:
            fields.pop(key, None)
        if record.name == ACCESS_LOGGER:
            access = access_fields(record)
            if access:
                event = event or "http_request"
                fields = access | fields
        if event is not None:
            line["event"] = event
        line["message"] = record.getMessage()
        for key in JOB_FIELDS:
            if key in fields:
                line[key] = fields.pop(key)
        for key, value in fields.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """method, path, status and client of uvicorn's access line (its args); {} for another record."""
    try:
        client, method, path, _version, status = record.args
    except (TypeError, ValueError):
        return {}
    return {"method": method, "path": path, "status": status, "client": client}


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT)


def configure_logging(fmt: str | None = None, *, stream: TextIO | None = None) -> str:
    """The CLI's logging: INFO to stderr (or `stream`) as `log_format(fmt)` chooses, chatty libraries
    at WARNING, known noise off; in json, Python warnings become log lines too. Returns the format.
    Like logging.basicConfig, it leaves a root logger that already has handlers alone."""
    stream = sys.stderr if stream is None else stream
    chosen = log_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(chosen))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for chatty in ("alembic.runtime.plugins", "pgserver"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if chosen == "json":
        logging.captureWarnings(True)
    quiet_known_warnings()
    return chosen


def configure_child_logging() -> None:
    """The pipeline child's logging (a spawned interpreter, its stderr the worker's): in json, its
    warnings and errors as JSON lines too; in text, Python's default (warnings and errors, bare),
    as before. Known noise off in both."""
    if log_format() == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
        logging.captureWarnings(True)
    quiet_known_warnings()


def quiet_known_warnings() -> None:
    """Hide the third-party warnings every run prints and no operator can act on; each one named,
    with where it comes from. Everything else still shows. Called by the CLI and the pipeline child."""
    # platformdirs, when pgserver is imported: containers often have no XDG_RUNTIME_DIR (it uses /tmp).
    warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR is not set")
    # diffusers' AutoencoderOobleck (pipeline/vae.py) builds its convs with the old torch weight_norm,
    # whose parameter names the VAE checkpoints use.
    warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is deprecated", category=FutureWarning)
    # transformers renamed Qwen3's `past_key_values` argument to `cache` (pipeline/lm/pt_backend.py
    # passes the old name, which still works).
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def redact_signed_query(path: str) -> str:
    """`path?query` with the query replaced by `?…` where it carries a signature or token."""
    route, sep, query = path.partition("?")
    if sep and (route.startswith(SIGNED_LINK_PREFIXES) or CREDENTIAL_PARAM.search(query)):
        return route + REDACTED_QUERY
    return path


def is_quiet(method: str, path: str, status: int) -> bool:
    """A successful poll, status read or download: the access-log lines that drown the rest."""
    if not 200 <= status < 400:
        return False
    route = path.partition("?")[0]
    return any(method in methods and pattern.fullmatch(route) for methods, pattern in QUIET_ROUTES)


class AccessLogFilter(logging.Filter):
    """On uvicorn's access log: signed links' query strings redacted; successful polls and downloads
    demoted to DEBUG (so shown only when the access log is at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            client, method, path, version, status = record.args
        except (TypeError, ValueError):  # not uvicorn's access line: leave it alone
            return True
        path = redact_signed_query(str(path))
        record.args = (client, method, path, version, status)
        if isinstance(status, int) and is_quiet(str(method), path, status):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def install_access_log_filter() -> None:
    """Put `AccessLogFilter` on uvicorn's access logger (once; uvicorn's own logging set-up keeps it)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, AccessLogFilter) for f in logger.filters):
        logger.addFilter(AccessLogFilter())
