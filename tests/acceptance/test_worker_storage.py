"""Object storage goes away during the upload and comes back: the job still completes."""

import socket
import threading
import time

import boto3
from botocore.config import Config

from tests.acceptance.worker_harness import start_worker, submit, wait_for, wait_status, worker_env


class SwitchableProxy:
    """A TCP proxy on 127.0.0.1 that forwards to `target_port`, or, while down, drops every connection."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up = True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_upload_outage_then_recovery_completes_the_job(store, db_url, tmp_path, s3_endpoint, s3_bucket):
    proxy = SwitchableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    env = worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="0.5", ACESTEP_STORAGE_URL=f"s3://{s3_bucket}/music",
                     ACESTEP_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    job_id = submit(store, caption="during an outage")
    worker = start_worker(env, "--once")
    try:
        wait_for(lambda: store.get(job_id)["status"] == "running", timeout=60)
        proxy.up = False
        wait_for(lambda: "uploading" == store.get(job_id)["stage"], timeout=60)
        time.sleep(3)  # the upload keeps failing meanwhile
        assert store.get(job_id)["status"] == "running"
        proxy.up = True
        row = wait_status(store, job_id, "succeeded", "failed", timeout=60)
    finally:
        output, _ = worker.communicate(timeout=60)
        proxy.close()
    assert row["status"] == "succeeded", output
    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"))
    for key in row["result"]["audio_keys"]:
        assert client.head_object(Bucket=s3_bucket, Key=f"music/{key}")["ContentLength"] > 0


def test_storage_down_for_good_fails_the_job_once_its_attempts_are_spent(store, db_url, tmp_path, s3_endpoint, s3_bucket):
    proxy = SwitchableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.up = False
    env = worker_env(db_url, tmp_path, ACESTEP_STORAGE_URL=f"s3://{s3_bucket}/music",
                     ACESTEP_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", ACESTEP_UPLOAD_TRIES="1",
                     ACESTEP_STORAGE_PATIENCE_SECONDS="0")
    job_id = submit(store, caption="storage is gone", batch_size=1)
    worker = start_worker(env, "--exit-when-idle", "2")
    try:
        row = wait_status(store, job_id, "succeeded", "failed", timeout=120)
    finally:
        output, _ = worker.communicate(timeout=60)
        proxy.close()
    assert row["status"] == "failed" and row["attempt"] == 3, output
    assert row["error"].startswith("could not store the audio: object storage unavailable")
    assert [e["retryable"] for e in row["errors"]] == [True, True, True]
