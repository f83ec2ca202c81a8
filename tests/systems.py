"""Whole llmq systems for tests: a gateway and Celery workers started as real processes."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cli.processes import Children, gateway_command, wait_ready, worker_command


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
