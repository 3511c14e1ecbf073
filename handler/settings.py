"""The one configuration object: read from ACESTEP_* variables in the entry point, passed down."""

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.contract import DEFAULT_DIT_MODEL, DIT_PREFIX, DURATION_MAX, DURATION_MIN, LM_PREFIX, PipelineOptions


DEFAULT_PIPELINE = "pipeline.service:load_pipeline"


MIN_SECRET_CHARS = 32
MIN_SECRET_DISTINCT = 10


class Settings(BaseSettings):
    """Configuration of every entry point. Names are a contract: see DESIGN's Configuration table."""

    model_config = SettingsConfigDict(env_prefix="ACESTEP_", extra="ignore", populate_by_name=True)

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
    cors_origins: str | None = Field(
        None, description="comma-separated browser origins CORS allows ('*': any; 'null': file:// pages); "
                          "unset: dev allows localhost, 127.0.0.1 (any port) and null, production none",
    )
    storage_url: str | None = Field(None, description="s3://bucket/prefix or file:///path; dev: a local directory")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset = AWS")
    secret_key: str | None = Field(
        None, validate_default=True,
        description="signs local file URLs, derives webhook secrets; dev makes one; production needs a strong shared one",
    )
    url_expires_seconds: int = Field(3600, ge=60, le=7 * 86400, description="lifetime of audio URLs")
    input_root: Path | None = Field(None, description="directory whose files src/reference_audio_path may name")
    max_upload_mb: float = Field(50, gt=0, le=2048, description="largest accepted audio upload")
    max_input_audio_seconds: float = Field(
        600.0, gt=0, le=7200, description="longest audio input (upload or *_path file) a job may name, by its decoded header"
    )
    max_queued_per_key: int = Field(100, ge=1, description="queued jobs one API key may have at once")
    default_batch_size: int = Field(2, ge=1, le=8, description="batch_size when a request has none")
    eta_prior: Literal["gpu", "cpu-tiny"] = Field(
        "gpu", description="device class whose benchmarked stage costs price jobs until finished jobs teach the ETA"
    )
    checkpoint_dir: Path | None = Field(None, description="the checkpoints in the Hugging Face layout")
    pipeline: str = Field(DEFAULT_PIPELINE, description="module:callable that loads the pipeline")
    # What the pipeline loads and runs on (handed to it as PipelineOptions; the pipeline reads no environment).
    dit_model: str = Field(
        DEFAULT_DIT_MODEL, validation_alias=AliasChoices("ACESTEP_DIT_MODEL", "ACESTEP_DEFAULT_MODEL", "dit_model"),
        description="the one DiT a worker serves (its folder name); jobs are labelled with it",
    )
    dit_models: str = Field(
        "", description="comma-separated extra DiT folders a worker loads beside ACESTEP_DIT_MODEL (requests name "
                        "them in `model`); empty: only ACESTEP_DIT_MODEL",
    )
    dit_memory_budget_gb: float | None = Field(
        None, gt=0, description="GiB the served DiTs may take together: ACESTEP_DIT_MODEL loaded at start, the others "
                                "on first use, the least recently used evicted; unset: every one loaded at start",
    )
    device: str | None = Field(None, description="cpu, cuda or cuda:N; unset: CUDA when present")
    lm_models: str = Field("", description="comma-separated 5 Hz LM folders to load; empty: every one found")
    lm_model: str | None = Field(None, description="the LM used without lm_model_path; unset: the 1.7B, else the first")
    lm_max_duration: int = Field(DURATION_MAX, ge=DURATION_MIN, le=DURATION_MAX, description="longest song the LM may plan (s)")
    vllm: bool = Field(True, description="start vllm engines for the LMs where vllm and CUDA are there")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share each LM's vllm engine takes")
    worker_batch_jobs: int = Field(1, ge=1, le=64, description="jobs one GPU batch may hold (compatible jobs only)")
    job_timeout_seconds: float = Field(1800.0, gt=0, description="a job running longer is stopped and fails")
    max_job_seconds: float | None = Field(
        None, gt=0, description="refuse a job the ETA's cost model prices above this; unset: the job timeout"
    )
    sync_timeout_seconds: float = Field(
        600.0, gt=0, le=3600, description="how long /format_input, /v1/create_sample and /v1/chat/completions wait for their job"
    )
    upload_tries: int = Field(6, ge=1, le=20, description="tries per attempt to store a result (doubling backoff)")
    storage_patience_seconds: float = Field(
        300.0, ge=0, description="how long made audio waits for object storage to come back before the attempt fails"
    )
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="how long SIGTERM lets running jobs finish")
    retention_seconds: float = Field(7 * 86400, gt=0, description="finished jobs and their files are deleted this long after")
    webhook_max_attempts: int = Field(10, ge=1, le=100, description="POSTs per webhook before giving up")
    webhook_retry_base_seconds: float = Field(5.0, ge=0, description="backoff after a failed webhook POST; doubles")
    webhook_retry_max_seconds: float = Field(3600.0, ge=0, description="longest backoff between webhook POSTs")
    webhook_allow_networks: str = Field(
        "", description="comma-separated CIDRs webhooks may reach besides public addresses (e.g. 10.0.0.0/8); "
                        "empty: public addresses only (loopback, private, link-local and metadata refused)",
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300, description="total time one webhook POST may take")
    # Observability (handler/logs.py, handler/metrics.py).
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json: one JSON object per log line; text: one readable line; auto: text when stderr "
                            "is a terminal, else json",
    )
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at GET /metrics (no API key needed)")
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="port a worker serves its Prometheus metrics on (/metrics); unset: none"
    )
    worker_metrics_host: str = Field("0.0.0.0", description="address the worker's metrics port listens on")
    # The RunPod trigger (python -m handler.platforms.runpod_trigger): drains started through RunPod's API.
    runpod_endpoint_id: str | None = Field(None, description="the RunPod serverless endpoint that runs the worker image")
    runpod_api_key: str | None = Field(None, description="a RunPod API key that may run jobs on that endpoint")
    runpod_api_url: str = Field("https://api.runpod.ai/v2", description="RunPod's endpoint API")
    runpod_max_drains: int = Field(2, ge=1, le=100, description="RunPod jobs (drains) in flight at most")
    runpod_stream: bool = Field(False, description="RunPod handler: progress and output as stream chunks")
    runpod_drain_budget_seconds: float = Field(
        540.0, gt=0, description="each drain's time budget; under the endpoint's execution timeout"
    )

    @field_validator("secret_key")
    @classmethod
    def _shared_secret(cls, value: str | None, info) -> str | None:
        """Every API process and worker of a production deployment must sign with one strong key: a
        secret each replica made for itself would make the others' links and webhook secrets wrong."""
        if info.data.get("env") == "production" and (
            value is None or len(value) < MIN_SECRET_CHARS or len(set(value)) < MIN_SECRET_DISTINCT
        ):
            raise ValueError(f"production needs a strong secret shared by every API process and worker: at least "
                             f"{MIN_SECRET_CHARS} characters, not a repeated few (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("dit_model")
    @classmethod
    def _dit_name(cls, value: str) -> str:
        if not re.fullmatch(rf"{re.escape(DIT_PREFIX)}[A-Za-z0-9._-]+", value):
            raise ValueError(f"must name a DiT checkpoint folder ({DIT_PREFIX}...), e.g. {DEFAULT_DIT_MODEL}")
        return value

    @field_validator("dit_models")
    @classmethod
    def _dit_names(cls, value: str) -> str:
        names = list(dict.fromkeys(_names(value)))
        bad = [name for name in names if not re.fullmatch(rf"{re.escape(DIT_PREFIX)}[A-Za-z0-9._-]+", name)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: every entry must be a DiT checkpoint folder ({DIT_PREFIX}...), "
                             f"e.g. {DEFAULT_DIT_MODEL},acestep-v15-base")
        return ",".join(names)

    def served_dit_models(self) -> tuple[str, ...]:
        """The DiTs this deployment's workers load: ACESTEP_DIT_MODEL, then ACESTEP_DIT_MODELS."""
        return tuple(dict.fromkeys([self.dit_model, *_names(self.dit_models)]))

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        if value is None:
            return None
        origins = [o.rstrip("/") for o in _names(value)]
        bad = [o for o in origins if o not in ("*", "null") and not re.fullmatch(r"https?://[^/\s?#]+", o)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: each origin must be scheme://host[:port] (no path), 'null' or '*'")
        return ",".join(origins)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value.strip()):
            raise ValueError("must be cpu, cuda, cuda:N or mps")
        return value.strip() if value else None

    @field_validator("lm_models")
    @classmethod
    def _lm_names(cls, value: str) -> str:
        bad = [name for name in _names(value) if not name.startswith(LM_PREFIX)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: every entry must be a 5 Hz LM folder ({LM_PREFIX}...)")
        return ",".join(_names(value))

    @field_validator("lm_model")
    @classmethod
    def _lm_name(cls, value: str | None) -> str | None:
        if value and not value.startswith(LM_PREFIX):
            raise ValueError(f"must be a 5 Hz LM folder ({LM_PREFIX}...), e.g. {LM_PREFIX}1.7B")
        return value or None

    @model_validator(mode="after")
    def _default_lm_loaded(self) -> "Settings":
        if self.lm_model and self.lm_models and self.lm_model not in _names(self.lm_models):
            raise ValueError(f"ACESTEP_LM_MODEL ({self.lm_model}) must be one of ACESTEP_LM_MODELS ({self.lm_models})")
        return self

    def pipeline_options(self) -> PipelineOptions:
        """What the worker hands its pipeline."""
        return PipelineOptions(
            device=self.device, dit_model=self.dit_model,
            dit_models=tuple(m for m in _names(self.dit_models) if m != self.dit_model),
            lm_models=tuple(_names(self.lm_models)), lm_model=self.lm_model,
            lm_max_duration=self.lm_max_duration, vllm=self.vllm, vllm_gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            dit_memory_budget_gb=self.dit_memory_budget_gb,
        )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> "Settings":
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"ACESTEP_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be at most half of "
                f"ACESTEP_LEASE_SECONDS ({self.lease_seconds}), or a busy worker loses its jobs"
            )
        return self


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]
