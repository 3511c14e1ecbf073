"""The one configuration object: read from ACESTEP_* variables in the entry point, passed down."""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> "Settings":
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"ACESTEP_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be at most half of "
                f"ACESTEP_LEASE_SECONDS ({self.lease_seconds}), or a busy worker loses its jobs"
            )
        return self
