"""Logging for every entry point: one format, the harmless third-party warnings kept out, and an
access log that shows what matters (submits, refusals, errors) rather than every poll, with the
query strings of signed links redacted."""

import logging
import re
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
    ({"GET", "HEAD"}, re.compile(r"/health|/v1/stats")),
    ({"GET", "HEAD"}, re.compile(r"/v1/audio|/v1/files/.+")),
)


def configure_logging() -> None:
    """The CLI's logging: INFO to stderr in one format, chatty libraries at WARNING, known noise off."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for chatty in ("alembic.runtime.plugins", "pgserver"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
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
