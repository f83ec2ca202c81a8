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
    await connection.execute(_SUBMIT_FUNCTION)


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
    """The fine-tuned model row (tenant, base_model, deleted_at) with this id, or None."""
    async with _answering():
        query = "SELECT tenant, base_model, deleted_at FROM fine_tuned_models WHERE id = $1"
        return await pool.fetchrow(query, model_id)


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


_COLUMNS = "id, tenant, kind, status, model, base_model, params, attempt, max_attempts, cancel_requested, " \
    "published_at, created_at, updated_at"  # fmt: skip
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, false, $9, $9, $9)"
# The submit's transaction in one round trip: a function of the connection's session (pg_temp: created when the
# pool opens the connection, no migration), called as one statement in its own transaction. It takes the tenant's
# advisory lock, then counts and inserts; in a VOLATILE function each statement takes a new snapshot, so the count
# (after the lock was granted) sees every job committed by whoever held the lock before. It answers NULL when the
# row went in (committed once the statement returns), else the active count that refused it.
_SUBMIT_FUNCTION = f"""
CREATE OR REPLACE FUNCTION pg_temp.llmq_insert_job(
    job_id varchar, job_tenant varchar, job_kind varchar, job_status varchar, job_model varchar,
    job_base_model varchar, job_params jsonb, job_max_attempts integer, job_now timestamptz,
    lock_key bigint, quota integer, active_statuses varchar[]
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT count(*) INTO active FROM (
        SELECT 1 FROM jobs WHERE tenant = job_tenant AND status = ANY(active_statuses) AND batch_id IS NULL
        LIMIT quota
    ) AS a;
    IF active >= quota THEN
        RETURN active;
    END IF;
    INSERT INTO jobs ({_COLUMNS}) VALUES (job_id, job_tenant, job_kind, job_status, job_model, job_base_model,
        job_params, 0, job_max_attempts, false, job_now, job_now, job_now);
    RETURN NULL;
END
$$"""
_SUBMIT = "SELECT pg_temp.llmq_insert_job($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
_ACTIVE_STATUSES = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]


async def insert_job(pool: asyncpg.Pool, job: Job, quota: int) -> None:
    """Inserts a new queued job and commits, in one round trip: under the tenant's advisory lock when there is
    a quota, 429 when the tenant already has quota jobs queued or running (the count and the insert in one
    transaction after the lock, so that simultaneous submits of one tenant count one after another)."""
    values = (
        job.id, job.tenant, job.kind, job.status, job.model, job.base_model, job.params, job.max_attempts,
        job.created_at,
    )  # fmt: skip
    async with _answering(), pool.acquire() as connection:
        if not quota:
            await connection.execute(_INSERT, *values)  # one statement: its own transaction
            return
        active = await connection.fetchval(_SUBMIT, *values, tenant_lock_key(job.tenant), quota, _ACTIVE_STATUSES)
    if active is not None:
        raise RateLimited(f"{active} jobs queued or running; at most {quota} at once", retry_after=5)
