"""Object storage goes away during the upload and comes back: the job still completes."""

import time

import boto3
from botocore.config import Config

from tests.acceptance.worker_harness import start_worker, submit, wait_for, wait_status, worker_env
from tests.tcp_proxy import TcpProxy


def test_upload_outage_then_recovery_completes_the_job(store, db_url, tmp_path, s3_endpoint, s3_bucket):
    proxy = TcpProxy("127.0.0.1", int(s3_endpoint.rsplit(":", 1)[1]))
    env = worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="0.5", ACESTEP_STORAGE_URL=f"s3://{s3_bucket}/music",
                     ACESTEP_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    job_id = submit(store, caption="during an outage")
    worker = start_worker(env, "--once")
    try:
        wait_for(lambda: store.get(job_id)["status"] == "running", timeout=60)
        proxy.cut()
        wait_for(lambda: "uploading" == store.get(job_id)["stage"], timeout=60)
        time.sleep(3)  # the upload keeps failing meanwhile
        assert store.get(job_id)["status"] == "running"
        proxy.restore()
        row = wait_status(store, job_id, "succeeded", "failed", timeout=60)
    finally:
        output, _ = worker.communicate(timeout=60)
        proxy.close()
    assert row["status"] == "succeeded", output
    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"))
    for key in row["result"]["audio_keys"]:
        assert client.head_object(Bucket=s3_bucket, Key=f"music/{key}")["ContentLength"] > 0


def test_storage_down_for_good_fails_the_job_once_its_attempts_are_spent(store, db_url, tmp_path, s3_endpoint, s3_bucket):
    proxy = TcpProxy("127.0.0.1", int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.cut()
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
