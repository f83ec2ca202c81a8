"""Hosts for the multi-host test: network namespaces on a bridge, each host with a private disk of its own.

The test makes every namespace itself (`ip netns`, as root) and removes them afterwards. The bridge lives in
the "svc" namespace, which also runs the shared services (Postgres, Redis, the S3 server) bound to the
bridge's address; each other host is a namespace with one veth on that bridge and no route anywhere else.
Nothing is added to the machine's own namespace, so no address outside these namespaces (and their
loopback) can be reached or used. The bridge is in its own namespace, so runs side by side never collide.

A host's processes each start in a fresh mount namespace (`ip netns exec` makes one) where a tmpfs is
mounted over DISK: the host's disk, empty at start, seen by that process only and gone when it dies. All
hosts use the same path, so a process that reads a path another host wrote finds nothing there.

The test process itself joins a namespace per thread with setns(2) (`inside`), to talk to the hosts.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
SUBNET = "10.200.0"  # addresses of the test's own hosts, only ever inside its namespaces
SERVICES = "svc"


class NoNamespaces(RuntimeError):
    """This machine (or this user) cannot make network namespaces; the reason is the message."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NoNamespaces(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@dataclass
class Network:
    """The namespaces of one test run: "svc" with the bridge, and one per host."""

    hosts: list[str]
    tag: str = field(default_factory=lambda: f"llmq{os.getpid()}")
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The host's address on the bridge (svc: .1, the others from .2 in order)."""
        index = 1 if host == SERVICES else self.hosts.index(host) + 2
        return f"{SUBNET}.{index}"

    def create(self) -> None:
        """Makes the namespaces, the bridge and a veth per host; NoNamespaces (after cleaning up) if refused."""
        if os.geteuid() != 0:
            raise NoNamespaces("network namespaces need root (ip netns add)")
        try:
            svc = self._add(SERVICES)
            _ip("-n", svc, "link", "add", "br0", "type", "bridge")
            _ip("-n", svc, "addr", "add", f"{self.address(SERVICES)}/24", "dev", "br0")
            _ip("-n", svc, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ns = self._add(host)
                _ip("-n", svc, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", svc, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise

    def _add(self, host: str) -> str:
        ns = self.ns(host)
        _ip("netns", "add", ns)
        self.made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def destroy(self) -> None:
        """Removes every namespace made (their veths and the bridge go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def routes(self, host: str) -> list[str]:
        """The host's routing table, one route a line."""
        out = subprocess.run(["ip", "-n", self.ns(host), "route"], capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line.strip()]

    @contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Moves the calling thread into the host's namespace for the block (sockets made there stay there;
        child processes started there start there)."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.ns(host)}") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def command(self, host: str, disk: Path, copy: dict[str, Path], command: list[str]) -> list[str]:
        """command run on a host: in its namespace, with a fresh private tmpfs at disk, where copy's sources
        are first copied (name -> source), as a host would have its own copy of the base model."""
        copies = " && ".join(
            f"cp -r {shlex.quote(str(src))} {shlex.quote(str(disk / name))}" for name, src in copy.items()
        )
        script = (
            f'mount -t tmpfs -o size=4g llmq-host "$0" && mkdir "$0/tmp" "$0/home" && {copies or "true"} && exec "$@"'
        )
        return ["ip", "netns", "exec", self.ns(host), "sh", "-c", script, str(disk), *command]
