"""The benchmarks' system harness: a fresh Postgres database, and llmq's gateway and workers as real processes.

Postgres is the tests' server (LLMQ_TEST_DATABASE_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test);
each run creates its own database and drops it. Each script names its own Redis database.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.processes import Children, gateway_command, wait_ready, worker_command
from shared.migrate import upgrade

PG = os.environ.get("LLMQ_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin_dsn() -> str:
    """A psycopg DSN for the Postgres server's admin database (to create and drop databases)."""
    return PG.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, migrated Postgres database named prefix_<random> (its SQLAlchemy URL), dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{PG.rpartition('/')[0]}/{name}"
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_backends(db_url: str) -> list[int]:
    """Process ids of the Postgres backends connected to a database (this query's own left out)."""
    name = db_url.rpartition("/")[2]
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
        ).fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class System:
    """A running llmq: the gateway (process "gateway") and one worker per queue ("worker-<queue>")."""

    base_url: str
    env: dict[str, str]  # what its processes were started with
    children: Children
    log_dir: Path

    def pid(self, name: str) -> int:
        """The process id of a child ("gateway", "worker-generate", ...)."""
        return self.children.procs[name].pid

    @property
    def db_url(self) -> str:
        return self.env["LLMQ_DATABASE_URL"]


def start_system(
    env: Mapping[str, str], log_dir: Path, queues: Sequence[str] = ("generate",), gateway_workers: int = 1
) -> System:
    """Gateway (gateway_workers processes) and a worker per queue, on this environment minus its LLMQ_*
    variables plus env; returns once the gateway is ready (stops what it started if it never is)."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    full_env = {**inherited, **env, "LLMQ_API_PORT": str(port)}
    children = Children(env=full_env, log_dir=log_dir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        children.start("gateway", gateway_command("127.0.0.1", port, gateway_workers))
        for queue in queues:
            children.start(f"worker-{queue}", worker_command(queue))
        wait_ready(base_url, children)
    except BaseException:
        children.stop_all()
        raise
    return System(base_url=base_url, env=full_env, children=children, log_dir=log_dir)
