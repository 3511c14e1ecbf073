"""The access-log filter (polls quiet, signed links redacted) and the known third-party warnings
silenced in one place (issue 14)."""

import logging
import warnings

import pytest

from handler.logs import AccessLogFilter, quiet_known_warnings


def access_line(method: str, path: str, status: int) -> logging.LogRecord:
    """A record as uvicorn's access logger makes it."""
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", method, path, "1.1", status), None)


@pytest.fixture
def access_logger():
    logger = logging.getLogger("uvicorn.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/jobs/01a2-7e65", 200),
    ("GET", "/v1/jobs?before=2026-01-01", 200),
    ("POST", "/query_result", 200),
    ("GET", "/health", 200),
    ("GET", "/v1/stats", 200),
    ("GET", "/metrics", 200),  # a Prometheus scrape, every few seconds
    ("GET", "/v1/audio?path=tok.sig", 206),
    ("HEAD", "/v1/audio?path=tok.sig", 200),
    ("GET", "/v1/files/jobs/1/output-0.mp3?expires=1&signature=ab", 304),
])
def test_successful_polls_and_downloads_are_not_logged_at_info(access_logger, method, path, status):
    assert AccessLogFilter().filter(access_line(method, path, status)) is False


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/music/generate", 200),  # a submit
    ("POST", "/release_task", 200),
    ("GET", "/v1/jobs/01a2-7e65", 404),  # an error
    ("POST", "/query_result", 422),
    ("GET", "/health", 503),
    ("POST", "/v1/jobs/01a2-7e65/cancel", 200),
])
def test_submits_and_errors_stay_at_info(access_logger, method, path, status):
    record = access_line(method, path, status)
    assert AccessLogFilter().filter(record) is True and record.levelno == logging.INFO


def test_polls_show_when_the_access_log_is_at_debug(access_logger):
    access_logger.setLevel(logging.DEBUG)
    record = access_line("GET", "/v1/jobs/01a2", 200)
    assert AccessLogFilter().filter(record) is True and record.levelname == "DEBUG"


@pytest.mark.parametrize("path, shown", [
    ("/v1/audio?path=eyJrIjoi.c2ln", "/v1/audio?…"),
    ("/v1/files/jobs/1/output-0.mp3?expires=17&signature=3bfb", "/v1/files/jobs/1/output-0.mp3?…"),
    ("/v1/anything?X-Amz-Signature=ab&X-Amz-Credential=cd", "/v1/anything?…"),
    ("/v1/jobs?before=2026-01-01", "/v1/jobs?before=2026-01-01"),  # nothing secret: kept
])
def test_signed_query_strings_are_redacted(access_logger, path, shown):
    record = access_line("GET", path, 403)  # a refused link is logged, its token is not
    assert AccessLogFilter().filter(record) is True
    assert record.getMessage() == f'127.0.0.1:5000 - "GET {shown} HTTP/1.1" 403'


def test_other_records_pass_untouched(access_logger):
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "plain %s", ("text",), None)
    assert AccessLogFilter().filter(record) is True and record.getMessage() == "plain text"


def test_the_known_harmless_warnings_are_silenced_and_others_are_not(monkeypatch):
    import platformdirs
    import torch

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        torch.nn.utils.weight_norm(torch.nn.Conv1d(1, 1, 1))  # what diffusers' Oobleck VAE does
        platformdirs.user_runtime_path("acestep-test")  # what importing pgserver does
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                      "`Qwen3ForCausalLM.forward`. Use `cache` instead.", FutureWarning)  # transformers' text
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
