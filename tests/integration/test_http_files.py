"""The local storage backend's signed `/v1/files/...` URLs serve like `/v1/audio`: GET and HEAD,
Content-Length, one byte range (206), 416 past the end, so browser players can seek."""

import io
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings

AUDIO = bytes(range(256)) * 40  # 10 240 bytes, every byte position distinguishable mod 256
KEY = "jobs/00000000-0000-0000-0000-000000000001/attempt-1/output-0.mp3"


@pytest.fixture
def files(tmp_path, db_url):
    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data"), db_url)
    svc.storage.put(KEY, io.BytesIO(AUDIO), "audio/mpeg")
    parsed = urlparse(svc.job_url(KEY))
    return TestClient(create_app(svc)), f"{parsed.path}?{parsed.query}"


def test_get_and_head_say_the_length_and_accept_ranges(files):
    client, url = files
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == AUDIO
    assert whole.headers["content-length"] == str(len(AUDIO)) and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "audio/mpeg"
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(AUDIO)) and head.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("header,start,end", [("bytes=100-199", 100, 199), ("bytes=10000-", 10000, 10239),
                                              ("bytes=-40", 10200, 10239), ("bytes=10200-99999", 10200, 10239)])
def test_a_range_is_206_with_exactly_those_bytes(files, header, start, end):
    client, url = files
    part = client.get(url, headers={"Range": header})
    assert part.status_code == 206 and part.content == AUDIO[start:end + 1]
    assert part.headers["content-range"] == f"bytes {start}-{end}/{len(AUDIO)}"
    assert part.headers["content-length"] == str(end - start + 1)
    head = client.head(url, headers={"Range": header})
    assert head.status_code == 206 and head.headers["content-length"] == str(end - start + 1)


def test_a_range_past_the_end_is_416_naming_the_size(files):
    client, url = files
    refused = client.get(url, headers={"Range": "bytes=20000-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{len(AUDIO)}"
    assert [p["field"] for p in refused.json()["detail"]] == ["Range"]


def test_forged_or_missing_signatures_are_refused_in_the_one_shape(files):
    client, url = files
    forged = client.get(url.replace("signature=", "signature=0"))
    assert forged.status_code == 403 and forged.json()["detail"][0]["field"] == "signature"
    unsigned = client.get(url.split("?")[0])
    assert unsigned.status_code == 422
    assert {p["field"] for p in unsigned.json()["detail"]} == {"expires", "signature"}
