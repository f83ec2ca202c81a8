"""ORM models: the job row is the source of truth for every job."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The tenant of every request when API keys are not required. Migration 0004 made it the tenant columns' server
# default too (the rows that existed then got it); the models say so, so that they and the migrated schema agree
# (tests/test_schema_agreement.py).
DEFAULT_TENANT = "default"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A fresh random id such as gen-3f9a...; prefixes tell the kind apart in logs."""
    return f"{prefix}-{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# JSON columns: jsonb on Postgres, which refuses what its readers could not read back (NUL, lone surrogates);
# every engine writes them through shared.storable.dumps, which replaces those first (migration 0006).
StoredJSON = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: StoredJSON, datetime: UTCDateTime}


class Job(Base):
    """One unit of work: a generation or a fine-tune. Only shared.job_states changes its status."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    kind: Mapped[str] = mapped_column(String(16))  # "generate" | "train" | "export" (shared.job_data.JobKind)
    status: Mapped[str] = mapped_column(String(16))  # see shared.statuses.JobStatus
    model: Mapped[str] = mapped_column(String(512))  # what the client asked for (base or fine-tuned id)
    base_model: Mapped[str] = mapped_column(String(512))  # the base it runs on: workers claim by it
    params: Mapped[dict[str, Any]] = mapped_column(StoredJSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(StoredJSON, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(StoredJSON, default=None)  # {code, message}

    # Each claim increments attempt; every later write of the worker names the attempt it holds.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    pause_requested: Mapped[bool] = mapped_column(default=False, server_default=false())  # migration 0008
    published_at: Mapped[datetime | None] = mapped_column(default=None)  # last message sent for it
    # Claims take higher priority first, then the oldest: interactive jobs 0, batch requests below (0010).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A request of a batch (migration 0010): its batch, its custom_id and its line in the input file.
    batch_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    custom_id: Mapped[str | None] = mapped_column(String(512), default=None)
    batch_line: Mapped[int | None] = mapped_column(Integer, default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # The claim (ix_jobs_claim, below the class) scans queued jobs of one kind and base model in claim order;
    # listings go newest first.
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_tenant_status", "tenant", "status"),  # the per-tenant quota count
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),  # the reaper's scan
    )

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.kind}, {self.status}, attempt={self.attempt})"


# The claim's index, in the claim's order (shared.job_states.claim_batch: priority high to low, then oldest, then
# id): a worker reads the first queued rows of its kind and base model straight from it, interactive jobs ahead of
# any batch backlog, with no sort however many batch requests wait (migration 0011).
Index("ix_jobs_claim", Job.kind, Job.status, Job.base_model, Job.priority.desc(), Job.created_at, Job.id)


class TenantActiveJobs(Base):
    """A tenant's count of active jobs (queued or running, outside a batch) as of the last fold of its changes.
    On Postgres a trigger on jobs appends each change to tenant_active_changes and a submit folds them in, under
    the tenant's lock, to check the quota without counting (gateway/pg.py, migration 0012). Unused on SQLite."""

    __tablename__ = "tenant_active_jobs"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    active: Mapped[int] = mapped_column(BigInteger)


class TenantActiveChange(Base):
    """+1 when a job of the tenant became active, -1 when it stopped (written by the trigger only)."""

    __tablename__ = "tenant_active_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    delta: Mapped[int] = mapped_column(Integer)


class File(Base):
    """An uploaded training or validation file (validated Alpaca records) in the artifact store."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT, index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    records: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact store
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """One line of a job's history: a message, and for progress the figures behind it."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None] = mapped_column(StoredJSON, default=None)


class Checkpoint(Base):
    """A complete training checkpoint of a fine-tune, written by the worker that held the job."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact store
    metrics: Mapped[dict[str, Any]] = mapped_column(StoredJSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTunedModel(Base):
    """A finished fine-tune's adapter, servable by its id (ft:<base>:<suffix>:<job id>)."""

    __tablename__ = "fine_tuned_models"

    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT, index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    base_model: Mapped[str] = mapped_column(String(512))
    path: Mapped[str] = mapped_column(String(1024))  # adapter folder, relative to the artifact store
    manifest: Mapped[dict[str, Any]] = mapped_column(StoredJSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by DELETE /v1/models/{id}: no longer listed or served, its adapter removed; the row stays, since the
    # job's history names the model (migration 0008).
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    """An API key: only a hash of its secret is stored. The key belongs to one tenant."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Batch(Base):
    """An OpenAI batch: the requests of an input file, each run as a generation job (Job.batch_id)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))  # see shared.batch_schemas.BatchStatus
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column(StoredJSON, default=None)
    total: Mapped[int] = mapped_column(Integer)  # lines of the input file, bad ones included
    # The lines refused at creation: [{"line", "custom_id", "code", "message"}]; they go to the error file.
    line_errors: Mapped[dict[str, Any]] = mapped_column(StoredJSON)  # {"data": [...]}
    completed: Mapped[int] = mapped_column(Integer, default=0)  # request counts, written when finalized
    failed: Mapped[int] = mapped_column(Integer, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(64), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None] = mapped_column(default=None)
    finalizing_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime] = mapped_column()
    # Set when the reaper found the batch past expires_at with requests left (0011); it ends `expired`.
    expired_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant", "created_at"),
        Index("ix_batches_status", "status"),  # the reaper's scan for batches to finalize or expire (0011)
    )


class Worker(Base):
    """A worker process, as it last reported itself (shared/workers.py): live while its heartbeat is fresh."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid, as jobs' `worker` column names it
    kind: Mapped[str] = mapped_column(String(16))  # "generate" | "train": the queue it consumes
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(512))  # the base model it serves or trains on
    current_jobs: Mapped[dict[str, Any]] = mapped_column(StoredJSON)  # {"ids": [...]}: jobs it runs now
    draining: Mapped[bool] = mapped_column(default=False)  # stopping: claims nothing new
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
