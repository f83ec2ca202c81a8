"""Chaos fixtures: a private Redis and a private Postgres cluster, so tests may kill and restart them.

Other test runs on this machine share the Postgres and Redis on the default ports; nothing here ever
touches those. A session starts its own Postgres cluster (initdb in a fresh temporary folder, run as the
`postgres` OS user when we are root) and each test its own redis-server, on free ports; all of it is
removed afterwards. Each test gets an empty Redis and a fresh, migrated database on that cluster.
The machinery (servers, systems, audits) is in tests/chaos/harness.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.processes import Children
from tests.chaos.harness import RECOVERY, ChaosSystem, Jobs, PostgresCluster, RedisServer


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RECOVERY:
        return
    terminalreporter.section("chaos recovery times")
    for scenario, what, seconds in RECOVERY:
        terminalreporter.write_line(f"{scenario:<44} {seconds:7.1f} s   {what}")


@pytest.fixture
def chaos_redis() -> Iterator[RedisServer]:
    """An empty Redis of this test's own, killed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="llmq-chaos-redis-"))
    server = RedisServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """This session's own Postgres cluster, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="llmq-chaos-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def chaos_db(pg_cluster: PostgresCluster) -> str:
    """A fresh, migrated database on the session's cluster (started again if a test left it down)."""
    pg_cluster.ensure_running()
    return pg_cluster.create_database()


@pytest.fixture
def chaos_env(chaos_db: str, chaos_redis: RedisServer, tiny_model: Path) -> Iterator[Callable[..., ChaosSystem]]:
    """Makes ChaosSystems (nothing started yet) on this test's Redis and database; stops them afterwards."""
    made: list[ChaosSystem] = []
    root = Path(tempfile.mkdtemp(prefix="llmq-chaos-data-"))

    def make(**extra: str) -> ChaosSystem:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
        data = root / f"system-{len(made)}"
        env = {
            **inherited,
            "LLMQ_DATABASE_URL": chaos_db,
            "LLMQ_BROKER_URL": chaos_redis.url,
            "LLMQ_DATA_DIR": str(data),
            "LLMQ_BASE_MODEL": str(tiny_model),
            "LLMQ_LEASE_SECONDS": "3",
            "LLMQ_REAPER_INTERVAL_SECONDS": "0.5",
            "LLMQ_REPUBLISH_AFTER_SECONDS": "2",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **{f"LLMQ_{k.upper()}": v for k, v in extra.items()},
        }
        system = ChaosSystem(
            env=env,
            log_dir=data / "logs",
            redis=chaos_redis,
            jobs=Jobs(chaos_db.replace("postgresql+psycopg://", "postgresql://")),
            children=Children(env=env, log_dir=data / "logs"),
        )
        made.append(system)
        return system

    try:
        yield make
    finally:
        for system in made:
            system.stop()
        keep = os.environ.get("LLMQ_CHAOS_KEEP_LOGS")
        if keep:
            for system in made:
                target = Path(keep) / f"{int(time.time())}-{system.log_dir.parent.name}"
                with contextlib.suppress(OSError):
                    shutil.copytree(system.log_dir, target)
        shutil.rmtree(root, ignore_errors=True)
