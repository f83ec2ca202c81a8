"""Fixtures: real Postgres and Redis (from LLMQ_TEST_* env or the local defaults), a tiny and a pretrained GPT-2,
and whole systems (gateway + Celery worker processes) started for a test session."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from cli.processes import Children, gateway_command, wait_ready, worker_command

TEST_DATABASE_URL = os.environ.get("LLMQ_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("LLMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin_dsn() -> str:
    return TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session, dropped afterwards."""
    from shared.migrate import upgrade

    name = f"llmq_test_{secrets.token_hex(4)}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    url = f"{base}/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_db(number: int) -> str:
    """The URL of another database on the test Redis server (tests that must not share a queue)."""
    return f"{TEST_REDIS_URL.rsplit('/', 1)[0]}/{number}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis database the running systems use, emptied once per session."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def quiet_redis_url() -> str:
    """A Redis database no worker consumes from, emptied once per session."""
    url = redis_db(13)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT-2 built offline from the shipped corpus."""
    from worker.model_factory import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llmq's small GPT-2 pretrained on shipped English: the model for tests that need one that learns."""
    from worker.model_factory import install_pretrained_gpt2

    return install_pretrained_gpt2(tmp_path_factory.mktemp("models") / "small-gpt2")


def configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Sets LLMQ_* variables for this process and forgets every cached settings-derived object."""
    for key, value in env.items():
        monkeypatch.setenv(f"LLMQ_{key.upper()}", value)
    reset_caches()


def reset_caches() -> None:
    from shared import celery_app, db, notify, settings

    settings.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    celery_app.get_celery.cache_clear()
    notify._client.cache_clear()


@dataclass
class System:
    """A running llmq: gateway and workers as real processes."""

    base_url: str
    env: dict[str, str]
    children: Children


def start_system(env: dict[str, str], log_dir: Path, queues: tuple[str, ...] = ("generate",)) -> System:
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    env = {**inherited, **env, "LLMQ_API_PORT": str(port)}
    children = Children(env=env, log_dir=log_dir)
    children.start("gateway", gateway_command("127.0.0.1", port))
    for queue in queues:
        children.start(f"worker-{queue}", worker_command(queue))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, children)
    except BaseException:
        children.stop_all()
        raise
    return System(base_url=base_url, env=env, children=children)


@pytest.fixture(scope="session")
def production_system(
    postgres_url: str, redis_url: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """Gateway + generate worker on real Postgres and Redis, serving the tiny GPT-2."""
    data = tmp_path_factory.mktemp("prod-data")
    env = {
        "LLMQ_DATABASE_URL": postgres_url,
        "LLMQ_BROKER_URL": redis_url,
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": str(tiny_model),
        "HF_HUB_OFFLINE": "1",
    }
    system = start_system(env, data / "logs")
    yield system
    system.children.stop_all()


@pytest.fixture(scope="session")
def embedded_system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway + generate worker on the embedded default (SQLite, file broker)."""
    from shared.migrate import upgrade

    data = tmp_path_factory.mktemp("embedded-data")
    upgrade(f"sqlite:///{data / 'llmq.db'}")
    env = {"LLMQ_DATA_DIR": str(data), "LLMQ_BASE_MODEL": str(tiny_model), "HF_HUB_OFFLINE": "1"}
    system = start_system(env, data / "logs")
    yield system
    system.children.stop_all()
