"""Whole llmq systems for tests: a gateway and Celery workers started as real processes."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from cli.processes import Children, gateway_command, wait_ready, worker_command
from tests.servers import own_database, redis_db


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class System:
    """A running llmq: gateway and workers as real processes."""

    base_url: str
    env: dict[str, str]
    children: Children


def start_system(env: dict[str, str], log_dir: Path, queues: tuple[str, ...] = ("generate",)) -> System:
    """A gateway and one worker per queue, started with env (LLMQ_* from this process left out), ready."""
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


@contextmanager
def isolated_system(
    name: str, redis_number: int, base_model: Path, data: Path, queues: tuple[str, ...], **env: str
) -> Iterator[System]:
    """A system with a database and a Redis db of its own (flushed), serving base_model: no other system's
    workers claim its jobs (they would miss its artifacts). env adds LLMQ_* settings (e.g. LLMQ_QUANTIZATION)."""
    broker_url = redis_db(redis_number)
    redis.Redis.from_url(broker_url).flushdb()
    with own_database(name) as database_url:
        settings = {
            "LLMQ_DATABASE_URL": database_url,
            "LLMQ_BROKER_URL": broker_url,
            "LLMQ_DATA_DIR": str(data),
            "LLMQ_BASE_MODEL": str(base_model),
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        system = start_system(settings, data / "logs", queues=queues)
        try:
            yield system
        finally:
            system.children.stop_all()
