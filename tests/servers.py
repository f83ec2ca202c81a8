"""The test Postgres and Redis servers: LLMQ_TEST_DATABASE_URL / LLMQ_TEST_REDIS_URL, or the local defaults."""

from __future__ import annotations

import os

TEST_DATABASE_URL = os.environ.get("LLMQ_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("LLMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def admin_dsn() -> str:
    """A psycopg DSN for the test Postgres server's admin database (to create and drop databases)."""
    return TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")


def redis_db(number: int) -> str:
    """The URL of another database on the test Redis server (tests that must not share a queue)."""
    return f"{TEST_REDIS_URL.rsplit('/', 1)[0]}/{number}"
