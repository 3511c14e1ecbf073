"""The one configuration object: read from ACESTEP_* variables in the entry point, passed down."""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


DEFAULT_PIPELINE = "pipeline.service:load_pipeline"


class Settings(BaseSettings):
    """Configuration of every entry point. Names are a contract: see DESIGN's Configuration table."""

    model_config = SettingsConfigDict(env_prefix="ACESTEP_", extra="ignore")

    database_url: str | None = Field(None, description="Postgres URL; `dev` starts an embedded server when unset")
    data_dir: Path = Field(Path(".acestep"), description="where `dev` keeps its embedded database and files")
    lease_seconds: float = Field(60.0, gt=0, description="how long a claimed job stays ours without a heartbeat")
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often a worker extends its leases")
    max_attempts: int = Field(3, ge=1, le=100, description="attempts per job before it fails for good")
    retry_base_seconds: float = Field(5.0, ge=0, description="backoff before the 2nd attempt; doubles after")
    retry_max_seconds: float = Field(300.0, ge=0, description="longest backoff between attempts")
    db_pool_size: int = Field(5, ge=1, le=200, description="connections per process")

    env: Literal["dev", "production"] = Field("dev", description="production refuses to run without API keys")
    allow_open: bool = Field(False, description="let production run without API keys anyway")
    require_keys: bool = Field(False, description="make dev check API keys too")
    host: str = Field("127.0.0.1", description="where `serve`/`dev` listen")
    port: int = Field(8001, ge=1, le=65535)
    public_url: str | None = Field(None, description="base URL clients reach this API at (signed file URLs)")
    storage_url: str | None = Field(None, description="s3://bucket/prefix or file:///path; dev: a local directory")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset = AWS")
    secret_key: str | None = Field(None, description="signs local file URLs, derives webhook secrets; dev makes one")
    url_expires_seconds: int = Field(3600, ge=60, le=7 * 86400, description="lifetime of audio URLs")
    input_root: Path | None = Field(None, description="directory whose files src/reference_audio_path may name")
    max_upload_mb: float = Field(50, gt=0, le=2048, description="largest accepted audio upload")
    max_queued_per_key: int = Field(100, ge=1, description="queued jobs one API key may have at once")
    default_batch_size: int = Field(2, ge=1, le=8, description="batch_size when a request has none")
    default_model: str = Field("acestep-v15-turbo", description="DiT model jobs run on")
    checkpoint_dir: Path | None = Field(None, description="the checkpoints in the Hugging Face layout")
    pipeline: str = Field(DEFAULT_PIPELINE, description="module:callable that loads the pipeline")
    worker_batch_jobs: int = Field(1, ge=1, le=64, description="jobs one GPU batch may hold (compatible jobs only)")
    job_timeout_seconds: float = Field(1800.0, gt=0, description="a job running longer is stopped and fails")
    upload_tries: int = Field(6, ge=1, le=20, description="tries per attempt to store a result (doubling backoff)")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="how long SIGTERM lets running jobs finish")
    retention_seconds: float = Field(7 * 86400, gt=0, description="finished jobs and their files are deleted this long after")
    webhook_max_attempts: int = Field(10, ge=1, le=100, description="POSTs per webhook before giving up")
    webhook_retry_base_seconds: float = Field(5.0, ge=0, description="backoff after a failed webhook POST; doubles")
    webhook_retry_max_seconds: float = Field(3600.0, ge=0, description="longest backoff between webhook POSTs")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> "Settings":
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"ACESTEP_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be at most half of "
                f"ACESTEP_LEASE_SECONDS ({self.lease_seconds}), or a busy worker loses its jobs"
            )
        return self
