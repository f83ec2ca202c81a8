"""The test Postgres and Redis servers: LLMQ_TEST_DATABASE_URL / LLMQ_TEST_REDIS_URL, or the local defaults.

Under pytest-xdist (`scripts/test -n 2`) each worker process is a test session of its own: Postgres
databases are already per session (conftest makes a fresh one), and every Redis database number a test uses
(the main one and those of `redis_db`) is moved down by 8 on the second worker, so that no worker consumes
another's queues. Tests use numbers 10-15; keep LLMQ_TEST_REDIS_URL's database outside 10-14.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

TEST_DATABASE_URL = os.environ.get("LLMQ_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_REDIS_URL = os.environ.get("LLMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw<N>" in an xdist worker
_OFFSET = 8 * int(_WORKER.removeprefix("gw"))
if _OFFSET > 8:
    raise RuntimeError("the tests share one Redis server between at most 2 xdist workers: use -n 2 or fewer")


def redis_db(number: int) -> str:
    """The URL of another database on the test Redis server (tests that must not share a queue)."""
    if not _OFFSET <= number < 16:
        raise ValueError(f"Redis database {number} is out of this worker's range")
    return f"{_REDIS_URL.rsplit('/', 1)[0]}/{number - _OFFSET}"


TEST_REDIS_URL = redis_db(int(_REDIS_URL.rsplit("/", 1)[1] or 0))


def admin_dsn() -> str:
    """A psycopg DSN for the test Postgres server's admin database (to create and drop databases)."""
    return TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def own_database(prefix: str) -> Iterator[str]:
    """A fresh, migrated Postgres database (its SQLAlchemy URL), dropped afterwards. A system whose workers must
    claim only its own jobs needs one: workers claim waiting jobs from the database by base model, so a worker
    of another system on the same database and base model would take them (and miss their artifacts)."""
    from shared.migrate import upgrade

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{TEST_DATABASE_URL.rpartition('/')[0]}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
