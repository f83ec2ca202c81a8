"""Starting and stopping llmq's own processes (gateway, workers) as children of this one."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def gateway_command(host: str, port: int, workers: int = 1) -> list[str]:
    """The command line of a gateway process (workers > 1: that many processes on one port)."""
    return [
        sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory",
        "--host", host, "--port", str(port), "--log-level", "warning", "--no-access-log",
        "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
    ]  # fmt: skip


def worker_command(queue: str, name: str | None = None) -> list[str]:
    """The command line of a Celery worker process serving one queue."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queue,
        "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", name or f"{queue}-{os.getpid()}@%h",
    ]  # fmt: skip


def threads_per_worker(torch_threads: int, workers: int, cores: int | None = None) -> int:
    """torch threads for each of several workers sharing this machine: the setting when it is set, else an
    equal share of the cores (at least one), so that busy workers do not fight over the same cores."""
    if torch_threads:
        return torch_threads
    return max(1, (cores or os.cpu_count() or 1) // workers)


@dataclass
class Children:
    """Processes started by this one, stopped together (gracefully, then by force)."""

    env: Mapping[str, str]
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Starts a named child with this group's environment (plus env); output goes to log_dir/name.log."""
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stops one child: sig first, SIGKILL if it has not exited after timeout seconds."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        """Stops every child."""
        for name in list(self.procs):
            self.stop(name)

    def check_alive(self) -> None:
        """Raises RuntimeError naming any child that has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}")


def new_instance_id() -> str:
    """A fresh name for a gateway this process starts (LLMQ_INSTANCE_ID), which its /healthz reports back."""
    return f"llmq-{os.getpid()}-{secrets.token_hex(6)}"


def wait_ready(
    base_url: str, children: Children | None = None, timeout: float = 60, instance: str | None = None
) -> None:
    """Returns once the gateway's /readyz answers 200; raises TimeoutError otherwise.

    With instance: the answering server must be the gateway started with that instance id (its /healthz says
    so); RuntimeError when another server answers on the address, before anything is sent to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children is not None:
            children.check_alive()
        try:
            if instance is not None:
                _check_instance(base_url, instance)
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {base_url} not ready after {timeout} s")


def _check_instance(base_url: str, instance: str) -> None:
    """RuntimeError unless the server at base_url reports this instance id (httpx.HTTPError: nobody answers)."""
    answer = httpx.get(f"{base_url}/healthz", timeout=2)
    try:
        reported = answer.json().get("instance") if answer.status_code == 200 else None
    except ValueError:
        reported = None
    if reported != instance:
        raise RuntimeError(
            f"another server answers at {base_url}, not the gateway this command started "
            f"(it reports instance {reported!r}, ours is {instance!r}): stop it, or choose another port with "
            "LLMQ_API_PORT=<port>"
        )
