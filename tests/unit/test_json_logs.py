"""The JSON log format (issue 19): one JSON object per line with ts, level, logger, event and message
and the record's own fields; chosen by ACESTEP_LOG_FORMAT (auto: text on a terminal, JSON otherwise);
uvicorn's access lines as `http_request` events with the access filter's redaction kept."""

import io
import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from uuid import UUID

import pytest
from pydantic import ValidationError

from handler.logs import AccessLogFilter, JsonFormatter, log_format
from handler.settings import Settings
from tests.unit.test_logs import access_line, access_logger  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]


def record(message: str = "job %s: %s", args=("j-1", "succeeded"), level: int = logging.INFO, name: str = "handler.x",
           exc_info=None, **extra) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def formatted(rec: logging.LogRecord) -> dict:
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one object, one line
    return json.loads(line)


def test_a_line_about_a_job_carries_its_event_job_attempt_and_worker():
    line = formatted(record(action="job_done", job_id="j-1", attempt=2, worker_id="host-ab12", outcome="succeeded"))
    assert list(line)[:8] == ["ts", "level", "logger", "event", "message", "job_id", "attempt", "worker_id"]
    assert line["event"] == "job_done" and "action" not in line  # the call sites' `action` is the event
    assert line["message"] == "job j-1: succeeded" and line["level"] == "INFO" and line["logger"] == "handler.x"
    assert (line["job_id"], line["attempt"], line["worker_id"], line["outcome"]) == ("j-1", 2, "host-ab12", "succeeded")
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_an_event_may_be_given_as_event_and_a_line_without_one_has_none():
    assert formatted(record(event="worker_ready"))["event"] == "worker_ready"
    assert "event" not in formatted(record(message="plain", args=()))


def test_values_json_cannot_hold_are_written_as_text_and_fields_never_replace_the_core_ones():
    job = UUID("01a24d2f-8378-7c00-88a2-9437ba1e9542")
    line = formatted(record(action="x", job_id=job, root=Path("/data"), ids=[job]))
    assert line["job_id"] == str(job) and line["root"] == "/data" and line["ids"] == [str(job)]
    shadowed = formatted(record(action="x", ts="yesterday", logger="someone else"))
    assert shadowed["ts"] != "yesterday" and shadowed["logger"] == "handler.x"


def test_an_exception_is_kept_as_its_traceback_on_the_same_line():
    try:
        raise ValueError("the DiT exploded")
    except ValueError:
        rec = record(level=logging.ERROR, exc_info=sys.exc_info(), action="job_crashed")
    line = formatted(rec)
    assert line["event"] == "job_crashed" and "Traceback" in line["exc_info"] and "the DiT exploded" in line["exc_info"]


def test_an_access_line_is_an_http_request_event_with_its_signed_link_redacted(access_logger):
    rec = access_line("GET", "/v1/audio?path=eyJrIjoi.c2ln", 403)
    assert AccessLogFilter().filter(rec) is True
    line = formatted(rec)
    assert line["event"] == "http_request" and line["logger"] == "uvicorn.access"
    assert (line["method"], line["path"], line["status"], line["client"]) == ("GET", "/v1/audio?…", 403, "127.0.0.1:5000")
    assert "c2ln" not in json.dumps(line)


def test_a_successful_poll_or_scrape_stays_quiet_in_json_too(access_logger):
    for path in ("/v1/jobs/01a2", "/metrics"):
        rec = access_line("GET", path, 200)
        assert AccessLogFilter().filter(rec) is False and rec.levelname == "DEBUG"


@pytest.mark.parametrize("setting, tty, chosen", [
    ("json", True, "json"), ("text", False, "text"), ("auto", True, "text"), ("auto", False, "json"),
    (" JSON ", True, "json"),
])
def test_the_format_is_the_setting_or_for_auto_whether_stderr_is_a_terminal(setting, tty, chosen):
    stream = io.StringIO()
    stream.isatty = lambda: tty
    assert log_format(setting, stream) == chosen


def test_the_format_comes_from_acestep_log_format(monkeypatch):
    monkeypatch.setenv("ACESTEP_LOG_FORMAT", "text")
    assert log_format(stream=io.StringIO()) == "text"
    monkeypatch.delenv("ACESTEP_LOG_FORMAT")
    assert log_format(stream=io.StringIO()) == "json"  # auto, and a StringIO is no terminal


def test_the_settings_know_the_observability_variables():
    settings = Settings(_env_file=None)
    assert (settings.log_format, settings.metrics_enabled, settings.worker_metrics_port) == ("auto", True, None)
    assert Settings(_env_file=None, worker_metrics_port=9101).worker_metrics_port == 9101
    with pytest.raises(ValidationError, match="log_format"):
        Settings(_env_file=None, log_format="xml")
    with pytest.raises(ValidationError, match="worker_metrics_port"):
        Settings(_env_file=None, worker_metrics_port=0)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (the root logger untouched by pytest), stderr a pipe."""
    environ = {k: v for k, v in os.environ.items() if k != "ACESTEP_LOG_FORMAT"} | env
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60)


CLI_LOGGING = """
import logging, warnings
from handler.logs import configure_logging
print(configure_logging())
logging.getLogger("handler.worker.worker").info("job %s: %s", "j-1", "succeeded",
                                                extra={"action": "job_done", "job_id": "j-1", "attempt": 1})
warnings.warn("an operator should see this")
"""


def test_the_cli_logs_json_when_stderr_is_not_a_terminal_warnings_included():
    done = run_python(CLI_LOGGING)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "json"
    job, warned = [json.loads(line) for line in done.stderr.splitlines()]
    assert (job["event"], job["job_id"], job["attempt"], job["message"]) == ("job_done", "j-1", 1, "job j-1: succeeded")
    assert warned["logger"] == "py.warnings" and "an operator should see this" in warned["message"]


def test_the_cli_logs_readable_text_when_told():
    done = run_python(CLI_LOGGING, ACESTEP_LOG_FORMAT="text")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "text"
    assert " INFO handler.worker.worker: job j-1: succeeded" in done.stderr
    assert not done.stderr.lstrip().startswith("{")


def test_the_pipeline_child_logs_its_warnings_as_json_lines():
    code = ("import logging\nfrom handler.logs import configure_child_logging\nconfigure_child_logging()\n"
            "log = logging.getLogger('pipeline.service')\nlog.info('not shown')\n"
            "log.warning('vllm unavailable', extra={'action': 'vllm_fallback'})\n")
    done = run_python(code, ACESTEP_LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(line) for line in done.stderr.splitlines()]
    assert (line["event"], line["level"], line["message"]) == ("vllm_fallback", "WARNING", "vllm unavailable")
