"""A live HTTP function (uvicorn on 127.0.0.1) over a test database, and a fast fake worker that
claims jobs and writes short real audio files and results under the worker's result contract."""

import io
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np
import soundfile
import uvicorn

from db import JobStore
from handler.http.app import create_app
from handler.http.services import Services, build_services
from handler.settings import Settings
from handler.storage import AUDIO_CONTENT_TYPES

SAMPLE_RATE = 48000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def interrupt(proc, timeout: float = 60) -> None:
    """Ctrl-C a process (`dev`, a server) and wait for it; killed when it does not stop in time."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def audio_bytes(fmt: str = "wav", seconds: float = 0.5) -> bytes:
    t = np.linspace(0, seconds, int(SAMPLE_RATE * seconds), endpoint=False)
    tone = 0.2 * np.sin(2 * np.pi * 440 * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone, tone], axis=1), SAMPLE_RATE, format=fmt.upper())
    return buffer.getvalue()


@dataclass
class LiveApi:
    url: str
    services: Services
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_api(settings: Settings, database_url: str) -> LiveApi:
    services = build_services(settings, database_url)
    server = uvicorn.Server(uvicorn.Config(create_app(services), host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.02)
    return LiveApi(f"http://{settings.host}:{settings.port}", services, server, thread)


def run_fake_jobs(store: JobStore, storage, *, worker_id: str = "fake-worker") -> int:
    """Claim every claimable job and finish it as a worker would; returns how many were finished."""
    finished = 0
    while jobs := store.claim(worker_id, 8):
        for job in jobs:
            request = job.request
            if request.get("lm_task"):  # an LM task: echo its params as the answer, no audio
                task = request["lm_task"]
                answer = {"task": task["task"], "caption": f"formatted: {task['params'].get('caption', '')}"}
                store.complete(job, worker_id, {"audio_keys": [], "generation_info": "", "status_message": "",
                                                "seed_value": "", "lm_result": answer | {"params": task["params"]}})
                finished += 1
                continue
            fmt = request["audio_format"]
            keys = []
            for i in range(request["batch_size"]):
                key = f"jobs/{job.id}/output-{i}.{fmt}"
                storage.put(key, io.BytesIO(audio_bytes(fmt)), AUDIO_CONTENT_TYPES[fmt])
                keys.append(key)
            result = {
                "audio_keys": keys,
                "generation_info": f"Steps: {request['inference_steps']}, Scale: {request['guidance_scale']}",
                "status_message": "Generation completed successfully!",
                "seed_value": ",".join(str(1000 + i) for i in range(len(keys))),
            }
            if request["thinking"] or request["bpm"] is None:
                result |= {"bpm": request["bpm"] or 120, "duration": 30.0, "keyscale": "C major",
                           "timesignature": "4", "genres": "pop", "metas": {"bpm": 120}}
            store.complete(job, worker_id, result)
            finished += 1
    return finished


class FakeWorker:
    """Runs `run_fake_jobs` in the background until stopped."""

    def __init__(self, store: JobStore, storage):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(store, storage), daemon=True)

    def _loop(self, store, storage) -> None:
        while not self._stop.is_set():
            run_fake_jobs(store, storage)
            self._stop.wait(0.05)

    def __enter__(self) -> "FakeWorker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
