"""The hot paths' Postgres access from the event loop: an asyncpg pool per gateway process, no thread hop.

Authentication (the key row), submits (the tenant's lock, the quota count and the INSERT in one transaction)
and polls (one SELECT of the job) run here when the database is Postgres and the app's lifespan opened the pool
(app.state.pg). Everything else, and every path on the embedded SQLite default, keeps SQLAlchemy's sessions.

The SQL matches what the ORM writes (shared.models.Job, shared.job_states.create_job): JSON columns go through
shared.storable.dumps, timestamps are timezone-aware UTC. A database that does not answer is a 503 with
Retry-After, as on the SQLAlchemy paths; a value Postgres refuses is a 422.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import make_url

from gateway.errors import ApiError, RateLimited
from shared.storable import dumps
from shared.tenant_counts import FOLD, tenant_lock_key

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


@dataclass(slots=True)
class JobRow:
    """A job's columns as read (JOB_COLUMNS), without the ORM: building a Job from them cost a poll 10 % of its
    CPU."""

    id: str
    tenant: str
    kind: str
    status: str
    model: str
    base_model: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempt: int
    max_attempts: int
    worker: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    published_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


async def job_row(pool: asyncpg.Pool, job_id: str) -> JobRow | None:
    """Every column of the job with this id, or None (one autocommit SELECT)."""
    async with _answering():
        row = await pool.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
    return JobRow(**row) if row is not None else None


_COLUMNS = "id, tenant, kind, status, model, base_model, params, attempt, max_attempts, cancel_requested, " \
    "published_at, created_at, updated_at"  # fmt: skip
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, false, $9, $9, $9)"
# Submits in one round trip, several at a time: a function of the connection's session (pg_temp: created when
# the pool opens the connection, no migration), called as one statement in its own transaction. For each job in
# turn (sorted by lock key, so that two such transactions never wait for each other's locks in a cycle) it takes
# the tenant's advisory lock, reads the tenant's active count and inserts. The count is not counted: a trigger on
# jobs appends every +1 / -1 of the tenant's active jobs to tenant_active_changes (migration 0012), and the
# function folds them into tenant_active_jobs under the lock (one row, however many jobs are queued; counting
# cost 1 us a job, 1.2 ms a submit at the default quota). In a VOLATILE function each statement takes a new
# snapshot, so a fold after its lock was granted sees every change committed before it (the jobs inserted by
# whoever held the lock before, those inserted earlier in this statement, and every job a worker ended); a change
# not yet committed is folded at a later submit, and until then its job still counts as active, as it is. It
# answers, per job, NULL when the row went in (committed once the statement returns), else the active count that
# refused it.
_SUBMIT_FUNCTION = f"""
CREATE OR REPLACE FUNCTION pg_temp.llmq_insert_jobs(
    ids varchar[], tenants varchar[], kinds varchar[], statuses varchar[], models varchar[], base_models varchar[],
    params text[], max_attempts integer[], nows timestamptz[], lock_keys bigint[], quotas integer[]
) RETURNS bigint[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    answers bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(ids)]);
    active bigint;
BEGIN
    FOR i IN 1 .. cardinality(ids) LOOP
        PERFORM pg_advisory_xact_lock(lock_keys[i]);{FOLD.format(tenant="tenants[i]")} INTO active;
        IF active >= quotas[i] THEN
            answers[i] := active;
        ELSE
            INSERT INTO jobs ({_COLUMNS}) VALUES (ids[i], tenants[i], kinds[i], statuses[i], models[i],
                base_models[i], params[i]::jsonb, 0, max_attempts[i], false, nows[i], nows[i], nows[i]);
        END IF;
    END LOOP;
    RETURN answers;
END
$$"""
_SUBMIT = "SELECT pg_temp.llmq_insert_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"


@dataclass
class _Submit:
    job: JobRow
    params: str  # the job's params as stored (JSON text)
    quota: int
    answer: asyncio.Future[int | None]  # None: inserted; else the active count that refused it


IN_FLIGHT = 4  # group inserts a process has on their way at once (each on its own pooled connection)


class GroupedInserts:
    """Group commit of submits: while IN_FLIGHT inserts are on their way, the jobs of every submit that arrives
    go in together in the next one (one statement, one transaction, one round trip); under that, a job goes in
    at once. Several in flight keep Postgres' commits (each waits for its WAL flush) overlapping.
    Each submit still waits for its own row's commit. One value Postgres refuses (a NUL in a text) fails only
    its own job: the group is then inserted one job at a time."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._waiting: list[_Submit] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def insert(self, job: JobRow, quota: int) -> int | None:
        """None once the row is committed; the tenant's active count when its quota refused it."""
        loop = asyncio.get_running_loop()
        submit = _Submit(job, dumps(job.params), quota, loop.create_future())
        self._waiting.append(submit)
        if len(self._senders) < IN_FLIGHT:
            sender = loop.create_task(self._send_waiting())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await submit.answer

    async def _send_waiting(self) -> None:
        group: list[_Submit] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                await (self._settle(group[0]) if len(group) == 1 else self._settle_group(group))
        except asyncio.CancelledError:  # shutdown: nobody waits for ever
            _fail([*group, *self._waiting], asyncpg.InterfaceError("the gateway is shutting down"))
            self._waiting = []
            raise

    async def _settle_group(self, group: list[_Submit]) -> None:
        try:
            answers = await self._insert(group)
        except asyncpg.DataError:  # one job's value: one job at a time, so that only that one fails
            for one in group:
                await self._settle(one)
            return
        except Exception as exc:  # the database is down: every submit of the group answers it
            _fail(group, exc)
            return
        for one, answer in zip(group, answers, strict=True):
            _answer(one, answer)

    async def _settle(self, one: _Submit) -> None:
        try:
            (answer,) = await self._insert([one])
        except Exception as exc:
            _fail([one], exc)
            return
        _answer(one, answer)

    async def _insert(self, group: list[_Submit]) -> list[int | None]:
        keys = [tenant_lock_key(one.job.tenant) for one in group]
        order = sorted(range(len(group)), key=keys.__getitem__)
        jobs = [group[i].job for i in order]
        async with self.pool.acquire() as connection:
            answers = await connection.fetchval(
                _SUBMIT, [j.id for j in jobs], [j.tenant for j in jobs], [j.kind for j in jobs],
                [j.status for j in jobs], [j.model for j in jobs], [j.base_model for j in jobs],
                [group[i].params for i in order], [j.max_attempts for j in jobs], [j.created_at for j in jobs],
                [keys[i] for i in order], [group[i].quota for i in order],
            )  # fmt: skip
        found: list[int | None] = [None] * len(group)
        for position, i in enumerate(order):
            found[i] = answers[position]
        return found


def _answer(one: _Submit, answer: int | None) -> None:
    if not one.answer.done():  # its request may have been cancelled meanwhile
        one.answer.set_result(answer)


def _fail(group: list[_Submit], exc: BaseException) -> None:
    for one in group:
        if not one.answer.done():
            one.answer.set_exception(exc)


async def insert_job(pool: asyncpg.Pool, inserts: GroupedInserts, job: JobRow, quota: int) -> None:
    """Inserts a new queued job and commits: under the tenant's advisory lock when there is a quota, with the
    submits that come at the same time (GroupedInserts); 429 when the tenant already has quota jobs queued or
    running (the count and the insert after the lock, so that simultaneous submits of one tenant count one
    after another)."""
    async with _answering():
        if not quota:
            values = (
                job.id, job.tenant, job.kind, job.status, job.model, job.base_model, job.params,
                job.max_attempts, job.created_at,
            )  # fmt: skip
            async with pool.acquire() as connection:
                await connection.execute(_INSERT, *values)  # one statement: its own transaction
            return
        active = await inserts.insert(job, quota)
    if active is not None:
        raise RateLimited(f"{active} jobs queued or running; at most {quota} at once", retry_after=5)
