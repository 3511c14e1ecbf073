"""`acestep-serverless submit` (issue 14): `--param` keeps strings for string fields, and polling
prints no httpx line per request. And the live API's access log: polls quiet, links redacted."""

import logging
import re
from uuid import UUID

import httpx
import pytest

from handler.cli import main
from handler.logs import install_access_log_filter
from handler.settings import Settings
from tests.integration.http_harness import FakeWorker, free_port, start_api


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path / "data", port=free_port()), db_url)
    yield live
    live.stop()


@pytest.fixture
def restore_httpx_level():
    logger = logging.getLogger("httpx")
    level = logger.level
    yield
    logger.setLevel(level)


def test_string_params_stay_strings_and_polls_are_not_logged(api, tmp_path, capsys, caplog, restore_httpx_level):
    caplog.set_level(logging.INFO)
    with FakeWorker(api.services.store, api.services.storage):
        code = main(["submit", "--url", api.url, "--param", "time_signature=4", "--param", "bpm=120",
                     "--param", "batch_size=1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    job_id = re.search(r"job (\S+) ", err).group(1)
    request = api.services.store.get(UUID(job_id))["request"]
    assert request["time_signature"] == "4" and request["bpm"] == 120
    assert not [r for r in caplog.records if r.name.startswith("httpx") and r.levelno <= logging.INFO]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_log():
    logger = logging.getLogger("uvicorn.access")
    saved = logger.level, logger.disabled, list(logger.filters)
    lines = Lines()
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logger.addHandler(lines)
    install_access_log_filter()
    yield lines.lines
    logger.removeHandler(lines)
    logger.level, logger.disabled, logger.filters = saved[0], saved[1], saved[2]


def test_the_access_log_keeps_submits_and_errors_only(api, access_log):
    submitted = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "a"})
    job_id = submitted.json()["job_id"]
    assert httpx.get(f"{api.url}/v1/jobs/{job_id}").status_code == 200
    assert httpx.get(f"{api.url}/health").status_code == 200
    assert httpx.get(f"{api.url}/v1/jobs/not-a-job").status_code in (404, 422)
    forged = httpx.get(f"{api.url}/v1/files/jobs/{job_id}/output-0.mp3?expires=1&signature=deadbeef")
    assert forged.status_code == 403
    assert len(access_log) == 3, access_log
    assert '"POST /v1/music/generate HTTP/1.1" 200' in access_log[0]
    assert "/v1/jobs/not-a-job" in access_log[1]
    assert f'"GET /v1/files/jobs/{job_id}/output-0.mp3?… HTTP/1.1" 403' in access_log[2]
    assert "deadbeef" not in " ".join(access_log)
