"""The schema, as SQLAlchemy 2 models. Migrations must produce exactly this (a test checks)."""

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.states import JobStatus, WorkerState

JOB_STATUSES = tuple(s.value for s in JobStatus)
WORKER_STATES = tuple(s.value for s in WorkerState)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    """One generation request and everything that happens to it."""

    __tablename__ = "jobs"

    id: Mapped[UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    status: Mapped[str] = mapped_column(Text, server_default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    owner: Mapped[str] = mapped_column(Text, server_default="")
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str | None] = mapped_column(Text)
    request: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # Cost-model features (handler/http/cost_model.py), set at submit: the model that runs it, the
    # songs, seconds per song (NULL until known when the LM chooses; the worker fills it in), the
    # DiT steps its schedule runs, and what the LM does (0 nothing, 1 text, 2 audio codes).
    model: Mapped[str] = mapped_column(Text, server_default="")
    # The 5 Hz LM the job needs: "" none, "*" any LM, else that LM's folder name. With `model`, what
    # a worker must serve to claim the job.
    lm_model: Mapped[str] = mapped_column(Text, server_default="")
    task_type: Mapped[str] = mapped_column(Text, server_default="text2music")
    items: Mapped[int] = mapped_column(Integer, server_default="1")
    audio_seconds: Mapped[float | None] = mapped_column(Float)
    dit_steps: Mapped[int] = mapped_column(Integer, server_default="8")
    lm_mode: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    # What the finished job's stages cost ({"stages": {stage: seconds}, "audio_seconds", ...}).
    timings: Mapped[dict | None] = mapped_column(JSONB)
    # The finish the first ETA given for the job promised (submit + eta_seconds); /metrics' ETA error.
    eta_predicted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="3")
    worker_id: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    stage: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, server_default="0")
    result: Mapped[dict | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status"),
        CheckConstraint("max_attempts >= 1", name="max_attempts"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        CheckConstraint("(status = 'running') = (lease_expires_at IS NOT NULL)", name="lease_only_while_running"),
        # Claim order and queue_position; INCLUDE lets ETA sums read only the index.
        Index(
            "ix_jobs_queue",
            "priority",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            postgresql_include=["model", "lm_model", "task_type", "items", "audio_seconds", "dit_steps", "lm_mode"],
        ),
        # Only running jobs hold a lease. The predicate is on the lease, not the status, so the
        # fenced by-id writes (which test status) can only pick the primary key, whatever the stats say.
        Index("ix_jobs_lease", "lease_expires_at", postgresql_where=text("lease_expires_at IS NOT NULL")),
        Index("ix_jobs_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
        Index("ix_jobs_owner_created", "owner", "created_at"),
        Index("ix_jobs_owner_queued", "owner", postgresql_where=text("status = 'queued'")),
        Index(
            "uq_jobs_owner_idempotency_key",
            "owner",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class Worker(Base):
    """A GPU worker process: what it can run and when it last said it was alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    capacity: Mapped[int] = mapped_column(Integer, server_default="1")
    models: Mapped[list] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    state: Mapped[str] = mapped_column(Text, server_default=WorkerState.STARTING.value)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))

    __table_args__ = (
        CheckConstraint("capacity >= 0", name="capacity"),
        CheckConstraint(f"state IN {WORKER_STATES!r}", name="state"),
        Index("ix_workers_heartbeat_at", "heartbeat_at"),
    )


class ApiKey(Base):
    """A caller. Only the SHA-256 of the key is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """The outbox: one row per finished job that asked for a webhook, written by a trigger in the same
    transaction as the status change, so a notification can be late but never lost."""

    __tablename__ = "webhook_outbox"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    gave_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))

    __table_args__ = (
        Index(
            "ix_webhook_outbox_due",
            "next_attempt_at",
            postgresql_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
        ),
    )


class LoraAdapter(Base):
    """A LoRA/LoKr adapter a caller uploaded: a PEFT adapter folder stored as one archive in object
    storage. Jobs name adapters by `name`; a name is the caller's own (another owner may reuse it)."""

    __tablename__ = "lora_adapters"

    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    storage_key: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(Text)  # sha256 of the archive: workers cache adapters by it
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))  # adapter_config.json
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class LoraState(Base):
    """The upstream `/v1/lora/*` routes' adapter state, per caller: which adapters are loaded, active
    and at what scale; applied to that caller's later jobs that name no `lora` themselves."""

    __tablename__ = "lora_states"

    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    state: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
