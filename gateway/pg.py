"""The hot paths' Postgres access from the event loop: an asyncpg pool per gateway process, no thread hop.

Authentication (the key row), submits (the tenant's lock, the quota count and the INSERT in one transaction)
and polls (one SELECT of the job) run here when the database is Postgres and the app's lifespan opened the pool
(app.state.pg). Everything else, and every path on the embedded SQLite default, keeps SQLAlchemy's sessions.

The SQL matches what the ORM writes (shared.models.Job, shared.job_states.create_job): JSON columns go through
shared.storable.dumps, timestamps are timezone-aware UTC. A database that does not answer is a 503 with
Retry-After, as on the SQLAlchemy paths; a value Postgres refuses is a 422.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import make_url

from gateway.errors import ApiError, RateLimited
from shared.models import Job
from shared.statuses import JobStatus
from shared.storable import dumps

log = logging.getLogger(__name__)

# Connection trouble: the server is down, restarting, or dropped the connection.
DOWN = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
        asyncpg.exceptions.OperatorInterventionError)  # fmt: skip


class DatabaseDown(ApiError):
    status_code = 503
    code = "database_unavailable"
    type = "server_error"
    headers = {"Retry-After": "1"}


class Unstorable(ApiError):
    status_code = 422
    code = "invalid_request"


def asyncpg_dsn(url: str) -> str | None:
    """The asyncpg DSN of a SQLAlchemy Postgres URL; None for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


async def _setup_connection(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, encoder=dumps, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(connection: asyncpg.Connection) -> None:
    """No reset query when a connection goes back to the pool (asyncpg's default costs a round trip per
    release): these queries leave no session state behind (their advisory locks end with the transaction).
    A transaction left open (a request cancelled inside one) is rolled back."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


async def open_pool(url: str, size: int = 10) -> asyncpg.Pool | None:
    """A pool for a Postgres URL (None for another database). It connects lazily: a database that is down at
    start-up only fails the requests that need it, as with SQLAlchemy's pool."""
    dsn = asyncpg_dsn(url)
    if dsn is None:
        return None
    return await asyncpg.create_pool(
        dsn, min_size=0, max_size=size, init=_setup_connection, reset=_keep_session, command_timeout=30
    )


@asynccontextmanager
async def _answering() -> AsyncIterator[None]:
    """Connection failures as 503, values Postgres refuses (a NUL in a text) as 422."""
    try:
        yield
    except DOWN as exc:
        log.warning("database unavailable: %s", exc)
        raise DatabaseDown("database unavailable") from exc
    except asyncpg.DataError as exc:
        raise Unstorable("request holds a value the database cannot store (such as a NUL character)") from exc


async def key_row(pool: asyncpg.Pool, key_id: str) -> asyncpg.Record | None:
    """The API key row (tenant, secret_sha256, revoked_at) with this id, or None."""
    async with _answering():
        return await pool.fetchrow("SELECT tenant, secret_sha256, revoked_at FROM api_keys WHERE id = $1", key_id)


async def fine_tuned_model_row(pool: asyncpg.Pool, model_id: str) -> asyncpg.Record | None:
    """The fine-tuned model row (tenant, base_model) with this id, or None."""
    async with _answering():
        return await pool.fetchrow("SELECT tenant, base_model FROM fine_tuned_models WHERE id = $1", model_id)


JOB_COLUMNS = (
    "id, tenant, kind, status, model, base_model, params, result, error, attempt, max_attempts, worker, "
    "lease_expires_at, cancel_requested, published_at, created_at, started_at, finished_at, updated_at"
)


async def job_row(pool: asyncpg.Pool, job_id: str) -> dict[str, Any] | None:
    """Every column of the job with this id, or None (one autocommit SELECT)."""
    async with _answering():
        row = await pool.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
    return dict(row) if row is not None else None


def tenant_lock_key(tenant: str) -> int:
    """The advisory lock of a tenant's quota (the same as gateway.submission's on the SQLAlchemy path)."""
    digest = hashlib.blake2b(f"llmq-quota:{tenant}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_COUNT_ACTIVE = (
    "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant = $1 AND status = ANY($2::varchar[]) LIMIT $3) AS active"
)
_COLUMNS = "id, tenant, kind, status, model, base_model, params, attempt, max_attempts, cancel_requested, " \
    "published_at, created_at, updated_at"  # fmt: skip
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, false, $9, $9, $9)"
# The quota count and the INSERT in one statement (one round trip): the row goes in only while the tenant has
# fewer than $10 active jobs. The statement's snapshot is taken after the advisory lock was granted (the
# statement before it), so it sees every job committed by whoever held the lock before.
_INSERT_UNDER_QUOTA = (
    f"INSERT INTO jobs ({_COLUMNS}) SELECT $1::varchar, $2::varchar, $3::varchar, $4::varchar, $5::varchar, "
    "$6::varchar, $7::jsonb, 0, $8::integer, false, $9::timestamptz, $9, $9 "
    "WHERE (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant = $2 AND status = ANY($11::varchar[]) "
    "LIMIT $10) AS active) < $10"
)


async def insert_job(pool: asyncpg.Pool, job: Job, quota: int) -> None:
    """Inserts a new queued job and commits, under the tenant's advisory lock when there is a quota: 429 when
    the tenant already has quota jobs queued or running (their count and the insert in one transaction after
    the lock, so that simultaneous submits of one tenant count one after another)."""
    values = (
        job.id, job.tenant, job.kind, job.status, job.model, job.base_model, job.params, job.max_attempts,
        job.created_at,
    )  # fmt: skip
    active_statuses = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
    async with _answering(), pool.acquire() as connection:
        if not quota:
            await connection.execute(_INSERT, *values)  # one statement: its own transaction
            return
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", tenant_lock_key(job.tenant))
            inserted = await connection.execute(_INSERT_UNDER_QUOTA, *values, quota, active_statuses)
            if inserted == "INSERT 0 1":
                return
            active = await connection.fetchval(_COUNT_ACTIVE, job.tenant, active_statuses, quota)
        raise RateLimited(f"{active} jobs queued or running; at most {quota} at once", retry_after=5)
