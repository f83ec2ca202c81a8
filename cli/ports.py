"""Ports `llmq up` and `llmq demo` are about to bind: is each free, and if not, what holds it and what to do.

Checked before any child starts, so a busy port is reported as such (which port, which process, which setting
chooses another) instead of as a child that exited, and never mistaken for our own gateway answering.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import typer

from cli.exit_codes import FAILED, CliError
from shared.settings import Settings


@dataclass(frozen=True)
class PortUse:
    """A port a command will bind, what for, and the environment variable that moves it."""

    port: int
    what: str  # "the gateway", "the generate worker's /metrics"
    variable: str  # LLMQ_API_PORT


def is_free(host: str, port: int) -> bool:
    """True when host:port can be bound now (as a listening server would bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def holder(port: int, proc: Path = Path("/proc")) -> str | None:
    """'pid 1234: python -m uvicorn ...' for the process listening on this TCP port, when this machine says
    (Linux's /proc, processes this user may look at); None otherwise."""
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return None
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    command = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid_dir.name}: {command.strip()[:120]}"
        except OSError:  # gone, or not ours to read
            continue
    return None


def _listening_inodes(port: int, proc: Path) -> set[str]:
    """The socket inodes ('socket:[123]') listening on port, from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    return inodes


def busy_port_problem(host: str, uses: list[PortUse]) -> str | None:
    """One message naming every busy port among uses (what holds it, how to choose another); None if all free."""
    problems = []
    for use in uses:
        if is_free(host, use.port):
            continue
        held = holder(use.port)
        by = f", held by {held}" if held else " by another program"
        problems.append(
            f"port {use.port} on {host} ({use.what}) is in use{by}: stop that, or choose another port with "
            f"{use.variable}=<port>"
        )
    return "; ".join(problems) or None


def check_ports(settings: Settings, metrics_ports: tuple[int, ...] = ()) -> None:
    """CliError naming the gateway's port when it is busy (and what holds it); a note for a busy worker /metrics
    port (that worker serves none, and runs)."""
    problem = busy_port_problem(settings.api_host, [PortUse(settings.api_port, "the gateway", "LLMQ_API_PORT")])
    if problem is not None:
        raise CliError(problem, FAILED)
    moved_by = "LLMQ_WORKER_METRICS_PORT (workers take it +1 and +2)"
    note = busy_port_problem(
        settings.worker_metrics_host, [PortUse(p, "a worker's /metrics", moved_by) for p in metrics_ports]
    )
    if note is not None:
        typer.echo(f"note: {note}; that worker serves no /metrics", err=True)
