"""Uploads cannot exhaust the API or the worker (issue 16, items 2, 4, 13, 21): bodies are counted
while read (chunked too) and refused past the cap, the caller is checked before the body is read,
truncated audio and decompression bombs are refused at submit, the decoder never reads more than
its cap, a retried multipart submit is the same job, and only finished results are input keys."""

import io
import uuid

import httpx
import numpy as np
import pytest
import soundfile

from handler.http.auth import create_api_key
from handler.settings import Settings
from pipeline.audio_io import AudioError, load_audio
from tests.integration.http_harness import audio_bytes, free_port, run_fake_jobs, start_api


@pytest.fixture
def api(tmp_path, db_url):
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), require_keys=True, max_upload_mb=0.5,
                        max_input_audio_seconds=60)
    live = start_api(settings, db_url)
    yield live
    live.stop()


@pytest.fixture
def key(api):
    return create_api_key(api.services.store, "uploader")[1]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chunks(total: int, size: int = 64 * 1024, prefix: bytes = b"", suffix: bytes = b""):
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""
    yield prefix
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size
    yield suffix


def multipart_stream(boundary: str, fields: dict[str, str], file_name: str, file_size: int):
    head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="{file_name}"; filename="a.wav"\r\n' \
            f"Content-Type: audio/wav\r\n\r\n".encode()
    return chunks(file_size, prefix=head, suffix=f"\r\n--{boundary}--\r\n".encode())


def flac(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="FLAC")
    return buffer.getvalue()


def claiming_frames(data: bytes, frames: int) -> bytes:
    """A FLAC whose STREAMINFO says it holds `frames` samples (36 bits): a header-only bomb."""
    data = bytearray(data)
    at = 8 + 13  # "fLaC", the block header, then 10 bytes of sizes and 3 more of rate/channels/bits
    data[at] = (data[at] & 0xF0) | ((frames >> 32) & 0x0F)
    data[at + 1:at + 5] = (frames & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def test_a_chunked_multipart_body_is_refused_at_the_cap(api, key):
    """No Content-Length: the body is counted while read; past the cap, 413 (not spooled on)."""
    boundary = "b0undary"
    headers = bearer(key) | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with httpx.Client(base_url=api.url, timeout=60) as client:
        for route in ("/v1/music/generate", "/release_task"):
            response = client.post(route, headers=headers,
                                   content=multipart_stream(boundary, {"caption": "x"}, "other_file", 3 * 1024 * 1024))
            assert response.status_code == 413, (route, response.text)
        chunked_json = client.post("/v1/music/generate", headers=bearer(key) | {"Content-Type": "application/json"},
                                   content=chunks(3 * 1024 * 1024, prefix=b'{"caption": "'))
        assert chunked_json.status_code == 413
    assert api.services.store.stats()["counts"] == {}


def test_the_key_is_checked_before_the_body_is_read_on_the_reference_routes(api, key):
    with httpx.Client(base_url=api.url, timeout=60) as client:
        for route in ("/release_task", "/query_result", "/format_input", "/v1/create_sample", "/v1/music/random"):
            # A malformed body with a wrong key: 401 (the body was never parsed), not 400.
            refused = client.post(route, headers=bearer("ace_wrong") | {"Content-Type": "application/json"},
                                  content=b"[" * 100_000)
            assert refused.status_code == 401, (route, refused.text)
        big = client.post("/release_task", headers=bearer("ace_wrong") | {"Content-Type": "application/json"},
                          content=chunks(5 * 1024 * 1024, prefix=b'{"prompt": "'))
        assert big.status_code == 401
        # No header: an ai_token in the body still works, read from the body's first MiB only.
        assert client.post("/release_task", json={"prompt": "ok", "ai_token": key}).status_code == 200
        assert client.post("/release_task", json={"prompt": "no key"}).status_code == 401
        unauthenticated = client.post("/release_task", headers={"Content-Type": "application/json"},
                                      content=chunks(3 * 1024 * 1024, prefix=b'{"prompt": "'))
        assert unauthenticated.status_code == 401
        # A multipart body with its ai_token before the file (as requests and curl -F send it).
        upload = client.post("/release_task", data={"ai_token": key, "task_type": "cover"},
                             files={"ctx_audio": ("a.wav", audio_bytes("wav"), "audio/wav")})
        assert upload.status_code == 200, upload.text
        late_token = client.post("/release_task", files={"ctx_audio": ("a.wav", audio_bytes("wav"), "audio/wav"),
                                                          "ai_token": (None, "ace_wrong")}, data={"task_type": "cover"})
        assert late_token.status_code == 401


def test_truncated_audio_and_bombs_are_refused_at_submit_naming_the_field(api, key):
    whole = flac(5)
    with httpx.Client(base_url=api.url, timeout=60, headers=bearer(key)) as client:
        def submit(data: bytes):
            return client.post("/v1/music/generate", data={"task_type": "cover"},
                               files={"src_audio": ("a.flac", data, "audio/flac")})

        assert submit(whole).status_code == 200
        truncated = submit(whole[: len(whole) // 2])
        assert truncated.status_code == 400 and "src_audio" in truncated.text and "truncated" in truncated.text
        long = submit(flac(61))  # a few KB of silence, over ACESTEP_MAX_INPUT_AUDIO_SECONDS
        assert long.status_code == 422 and "src_audio" in long.text and "61 s" in long.text
        bomb = submit(claiming_frames(whole, 2**36 - 1))
        assert bomb.status_code == 422 and "src_audio" in bomb.text
    assert api.services.store.stats()["counts"] == {"queued": 1}


def test_the_decoder_reads_no_more_than_its_cap_whatever_the_header_claims():
    bomb = claiming_frames(flac(5), 2**36 - 1)
    assert soundfile.info(io.BytesIO(bomb)).frames == 2**36 - 1
    try:  # what is there, or an AudioError: never an allocation of 2^36 frames (a "GPU OOM")
        audio = load_audio(bomb)
        assert audio.shape[0] == 2 and audio.shape[1] <= 6 * 48000
    except AudioError:
        pass
    assert load_audio(flac(30), max_seconds=2).shape == (2, 2 * 48000)
    assert load_audio(flac(30), start_seconds=10, stop_seconds=12).shape == (2, 2 * 48000)


def test_a_retried_multipart_submit_is_the_same_job_even_with_the_queue_full(api):
    store = api.services.store
    _, small = create_api_key(store, "small", max_queued=1)
    wav = audio_bytes("wav")
    with httpx.Client(base_url=api.url, timeout=60, headers=bearer(small)) as client:
        def submit(key: str, data: bytes = wav):
            return client.post("/v1/music/generate", data={"task_type": "cover", "caption": "retry me"},
                               files={"src_audio": ("a.wav", data, "audio/wav")}, headers={"Idempotency-Key": key})

        first = submit("k1")
        assert first.status_code == 200, first.text
        again = submit("k1")  # the queue (1) is full now: a retry is still its job, not 429
        assert again.status_code == 200, again.text
        assert again.json()["job_id"] == first.json()["job_id"]
        assert submit("k2").status_code == 429  # a new request is refused
        assert submit("k1", audio_bytes("wav", seconds=0.7)).status_code == 409  # other bytes, same key
        run_fake_jobs(store, api.services.storage)
        assert submit("k1").json()["job_id"] == first.json()["job_id"]
    assert store.stats()["counts"] == {"succeeded": 1}
    job = store.get(uuid.UUID(first.json()["job_id"]))
    assert job["request"]["input_digests"]["src"].startswith("sha256:")


def test_only_audio_files_of_ones_own_jobs_are_input_keys_and_keys_are_normalised(api, key):
    store, storage = api.services.store, api.services.storage
    with httpx.Client(base_url=api.url, timeout=60, headers=bearer(key)) as client:
        made = client.post("/v1/music/generate", data={"task_type": "cover"},
                           files={"src_audio": ("a.wav", audio_bytes("wav"), "audio/wav")}).json()["job_id"]
        run_fake_jobs(store, storage)
        result = store.get(uuid.UUID(made))["result"]["audio_keys"][0]
        storage.put(f"jobs/{made}/notes.wav", io.BytesIO(audio_bytes("wav")), "audio/wav")  # not a job's audio file
        for bad in (f"jobs/{made}/..", f"jobs/{made}/../{made}/input-src.wav", f"jobs/{made}/./input-src.wav",
                    f"jobs/{made}/notes.wav", f"jobs/{made}/input-src.wav/..", f"jobs/{made}//input-src.wav"):
            refused = client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": bad})
            assert refused.status_code == 400 and "src_audio_path" in refused.text, (bad, refused.text)
        for good in (result, result.replace(made, made.upper()), f"jobs/{made.upper()}/input-src.wav"):
            accepted = client.post("/v1/music/generate", json={"task_type": "cover", "src_audio_path": good})
            assert accepted.status_code == 200, (good, accepted.text)
            stored = store.get(uuid.UUID(accepted.json()["job_id"]))["request"]["inputs"]["src"]["key"]
            assert stored == good.replace(made.upper(), made)  # the key as the job's files spell it
