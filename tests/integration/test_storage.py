"""Object storage: S3 over the real protocol (moto's server on 127.0.0.1) and the local directory."""

import io
import urllib.request
from urllib.parse import parse_qs, urlparse

import pytest

from handler.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    StorageUnavailable,
    storage_from_url,
)
from tests.integration.http_harness import free_port


@pytest.fixture
def s3(s3_endpoint, s3_bucket):
    return S3Storage(s3_bucket, "music", endpoint_url=s3_endpoint)


@pytest.fixture
def local(tmp_path):
    return LocalStorage(tmp_path / "objects", secret=b"k" * 32, public_base_url="http://127.0.0.1:8001")


@pytest.fixture(params=["s3", "local"])
def storage(request):
    return request.getfixturevalue(request.param)


def test_put_open_delete(storage):
    storage.put("jobs/abc/output-0.wav", io.BytesIO(b"RIFF....WAVE"), "audio/wav")
    with storage.open("jobs/abc/output-0.wav") as body:
        assert body.read() == b"RIFF....WAVE"
    storage.delete("jobs/abc/output-0.wav")
    with pytest.raises(ObjectNotFound):
        storage.open("jobs/abc/output-0.wav")


def test_delete_prefix_removes_a_jobs_objects_only(storage):
    for key in ["jobs/a/input-src.mp3", "jobs/a/output-0.mp3", "jobs/b/output-0.mp3"]:
        storage.put(key, io.BytesIO(key.encode()), "audio/mpeg")
    storage.delete_prefix("jobs/a/")
    with pytest.raises(ObjectNotFound):
        storage.open("jobs/a/output-0.mp3")
    assert storage.open("jobs/b/output-0.mp3").read() == b"jobs/b/output-0.mp3"


@pytest.mark.parametrize("key", ["../etc/passwd", "/etc/passwd", "jobs/../../x", "jobs//x", "jobs\\x", ""])
def test_keys_cannot_step_outside(storage, key):
    with pytest.raises(StorageError):
        storage.put(key, io.BytesIO(b"x"), "audio/wav")


def test_s3_url_is_a_sigv4_presigned_get_that_downloads(s3):
    s3.put("jobs/j/output-0.flac", io.BytesIO(b"fLaC-data"), "audio/flac")
    url = s3.url("jobs/j/output-0.flac", expires_in=600)
    query = parse_qs(urlparse(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-Credential"][0].endswith("/us-east-1/s3/aws4_request")
    assert len(query["X-Amz-Signature"][0]) == 64
    assert urlparse(url).path.endswith("/music/jobs/j/output-0.flac")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"fLaC-data"


def test_s3_outage_is_reported_as_unavailable(s3_endpoint):
    dead = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable):
        dead.put("jobs/x/output-0.wav", io.BytesIO(b"x"), "audio/wav")


def test_local_urls_are_signed_and_expire(local):
    url = local.url("jobs/j/output-0.mp3", expires_in=60, now=1000)
    parsed = urlparse(url)
    assert parsed.netloc == "127.0.0.1:8001" and parsed.path == "/v1/files/jobs/j/output-0.mp3"
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    expires, signature = int(query["expires"]), query["signature"]
    assert expires == 1060
    assert local.verify("jobs/j/output-0.mp3", expires, signature, now=1059)
    assert not local.verify("jobs/j/output-0.mp3", expires, signature, now=1061)
    assert not local.verify("jobs/k/output-0.mp3", expires, signature, now=1000)
    assert not local.verify("jobs/j/output-0.mp3", expires + 3600, signature, now=1000)
    assert not local.verify("jobs/j/output-0.mp3", expires, "\u0080" + signature[1:], now=1000)  # found by fuzzing
    other = LocalStorage(local.root, secret=b"x" * 32)
    assert not other.verify("jobs/j/output-0.mp3", expires, signature, now=1000)


def test_storage_urls(tmp_path):
    assert isinstance(storage_from_url(f"file://{tmp_path}", secret=b"s"), LocalStorage)
    s3 = storage_from_url("s3://my-bucket/some/prefix", secret=b"s", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    with pytest.raises(ValueError, match="ACESTEP_STORAGE_URL"):
        storage_from_url("ftp://host/x", secret=b"s")
