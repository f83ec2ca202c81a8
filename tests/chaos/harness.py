"""The chaos tests' machinery: our own Redis and Postgres servers, systems of real processes, audits.

The systems under test are real processes (uvicorn gateway, Celery workers) with short leases, a fast
reaper and fast lost-message repair, so that recovery takes seconds:
LLMQ_LEASE_SECONDS=3, LLMQ_REAPER_INTERVAL_SECONDS=0.5, LLMQ_REPUBLISH_AFTER_SECONDS=2.

How "exactly once" is observed: every generate worker logs `claimed N jobs: <id>@<attempt> ...` when its
conditional UPDATE hands it jobs, and `wrote <id>@<attempt>:<status> ...` for the outcomes its guarded
write actually stored (worker/serving.py). A job may run more than once (at-least-once delivery); its
outcome must be written once, by the attempt the row ends with.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg.rows import dict_row

from cli.processes import Children, gateway_command, wait_ready, worker_command
from shared.statuses import TERMINAL
from tests.systems import free_port

PG_BIN = Path(os.environ.get("LLMQ_CHAOS_PG_BIN", "/usr/lib/postgresql/15/bin"))

# Recovery times measured by the scenarios, printed at the end of the session (and kept in RELIABILITY.md).
RECOVERY: list[tuple[str, str, float]] = []


def record_recovery(scenario: str, what: str, seconds: float) -> None:
    """Notes a scenario's recovery time for the session summary."""
    RECOVERY.append((scenario, what, seconds))
    print(f"recovery: {scenario}: {what}: {seconds:.1f} s")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Polls predicate until it returns something truthy; that value. AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------------
# Redis
# ----------------------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of our own: no persistence, so a restart comes back empty. It binds host (loopback
    unless a test gives it another address of its own, as the multi-host test does)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.host = host
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.folder), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.folder}/redis.log")
            try:
                with self.client() as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 20, "redis-server to answer PING", interval=0.05)

    def kill(self) -> None:
        """SIGKILL: every queued and unacknowledged message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def queue_length(self, queue: str) -> int:
        with self.client() as client:
            return int(client.llen(queue))


# ----------------------------------------------------------------------------------------------------------
# Postgres
# ----------------------------------------------------------------------------------------------------------


class PostgresCluster:
    """A Postgres cluster of our own (initdb in a temporary folder); may be crashed and restarted. It listens
    on host (loopback unless a test gives it another address of its own)."""

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.host = host
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # Postgres refuses to run as root; as root we run it as the postgres OS user.
        self.user = "postgres" if os.geteuid() == 0 else None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            args, check=True, user=self.user, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def init(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"no Postgres binaries in {PG_BIN} (set LLMQ_CHAOS_PG_BIN)")
        self.sockets.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
            shutil.chown(self.sockets, self.user, self.user)
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        if self.host != "127.0.0.1":  # initdb trusts loopback only; also trust the hosts on this address's subnet
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")

    def start(self) -> None:
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 (the child owns it)
        if self.user is not None:
            shutil.chown(self.root / "postgres.log", self.user, self.user)
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", f"listen_addresses={self.host}", "-c", f"unix_socket_directories={self.sockets}",
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=300"],
            user=self.user, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_for(self.answers, 60, "Postgres to accept connections", interval=0.1)

    def answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"postgres is not running; see {self.root}/postgres.log")
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): every backend dies at once, as in a crash; the next start recovers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def create_database(self) -> str:
        """A fresh database migrated to head; its SQLAlchemy URL."""
        from shared.migrate import upgrade

        name = f"chaos_{secrets.token_hex(4)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.url(name)
        upgrade(url)
        return url


# ----------------------------------------------------------------------------------------------------------
# The system under test
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Jobs:
    """Reads job rows straight from the database (the test's view of the source of truth)."""

    dsn: str

    def rows(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        query = "SELECT id, status, attempt, max_attempts, error, result, worker, finished_at FROM jobs"
        with psycopg.connect(self.dsn, connect_timeout=3) as conn:
            cur = conn.cursor(row_factory=dict_row)
            if ids is None:
                cur.execute(query)
            else:
                cur.execute(query + " WHERE id = ANY(%s)", (list(ids),))
            return {row["id"]: row for row in cur.fetchall()}

    def unfinished(self, ids: Iterable[str]) -> list[str] | None:
        """Ids not yet terminal; None when the database does not answer."""
        try:
            rows = self.rows(ids)
        except psycopg.Error:
            return None
        return [i for i in ids if i not in rows or rows[i]["status"] not in TERMINAL]

    def wait_terminal(self, ids: list[str], timeout: float) -> float:
        """Waits until every job is terminal; the monotonic time it happened."""
        left: list[str] | None = list(ids)

        def done() -> bool:
            nonlocal left
            now = self.unfinished(ids)
            left = now if now is not None else left
            return now == []

        try:
            wait_for(done, timeout, f"{len(ids)} jobs to reach a terminal state", interval=0.1)
        except AssertionError:
            raise AssertionError(f"{len(left or [])} jobs not terminal after {timeout} s: {(left or [])[:5]}") from None
        return time.monotonic()

    def status_of(self, ids: Iterable[str]) -> dict[str, str]:
        return {i: r["status"] for i, r in self.rows(ids).items()}


CLAIMED = re.compile(r"claimed \d+ jobs: (.+)$")
WROTE = re.compile(r"wrote (.+)$")
UNKNOWN = re.compile(r"write-back failed, outcome unknown: (.+)$")


def log_messages(text: str) -> Iterator[str]:
    """The message of every log line, whether the process logs JSON objects or plain text."""
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                yield str(json.loads(line).get("message", ""))
                continue
            except ValueError:
                pass
        yield line


@dataclass
class Audit:
    """What the generate workers' logs say they did: claims (job@attempt) and written outcomes."""

    claims: dict[str, list[int]] = field(default_factory=dict)
    writes: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    # outcomes whose commit raised (the database died under it): they may or may not have landed
    unknown: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, texts: Iterable[str]) -> Audit:
        audit = cls()
        for text in texts:
            for message in log_messages(text):
                if claimed := CLAIMED.search(message):
                    for token in claimed.group(1).split():
                        job_id, _, attempt = token.partition("@")
                        audit.claims.setdefault(job_id, []).append(int(attempt))
                    continue
                for pattern, target in ((WROTE, audit.writes), (UNKNOWN, audit.unknown)):
                    if found := pattern.search(message):
                        for token in found.group(1).split():
                            job_id, _, rest = token.partition("@")
                            attempt, _, status = rest.partition(":")
                            target.setdefault(job_id, []).append((int(attempt), status))
        return audit


@dataclass
class ChaosSystem:
    """A gateway and any number of Celery workers as real processes, on this test's Redis and database."""

    env: dict[str, str]
    log_dir: Path
    redis: RedisServer
    jobs: Jobs
    children: Children
    base_url: str = ""
    _serial: int = 0
    _supervisors: list[tuple[threading.Event, threading.Thread]] = field(default_factory=list)
    deaths: list[tuple[str, float]] = field(default_factory=list)  # (worker name, monotonic time it died)

    # -- processes ----------------------------------------------------------------------------------------

    def start_gateway(self) -> None:
        port = free_port()
        self.env["LLMQ_API_PORT"] = str(port)
        self.children.start("gateway", gateway_command("127.0.0.1", port))
        self.base_url = f"http://127.0.0.1:{port}"
        wait_ready(self.base_url, self.children, timeout=90)

    def start_worker(self, queue: str = "generate", wait: bool = True) -> str:
        """Starts a worker (a fresh name and log per incarnation); its name. Waits until it consumes."""
        self._serial += 1
        name = f"worker-{queue}-{self._serial}"
        self.children.start(name, worker_command(queue, f"{queue}-{self._serial}@%h"))
        if wait:
            self.wait_worker_ready(name)
        return name

    def start_with_workers(self, count: int = 1, queue: str = "generate") -> list[str]:
        """Starts count workers and the gateway, their start-ups overlapping; the workers' names once all
        are ready."""
        names = [self.start_worker(queue, wait=False) for _ in range(count)]
        self.start_gateway()
        for name in names:
            self.wait_worker_ready(name)
        return names

    def assert_serves_new_work(self) -> None:
        """A job submitted now succeeds (the system is back to normal)."""
        (job_id,) = self.submit_many(1, max_tokens=2, prefix="after")
        self.jobs.wait_terminal([job_id], timeout=60)
        assert self.jobs.status_of([job_id]) == {job_id: "succeeded"}

    def wait_worker_ready(self, name: str, timeout: float = 120) -> None:
        def ready() -> bool:
            proc = self.children.procs.get(name)
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{name} exited; log:\n{self.log(name)[-3000:]}")
            return " ready." in self.log(name)  # logged after the model preload (worker_ready)

        wait_for(ready, timeout, f"{name} to be ready", interval=0.1)

    def pid(self, name: str) -> int:
        return self.children.procs[name].pid

    def worker_id(self, name: str) -> str:
        """The id a worker writes into jobs.worker (host:pid)."""
        import socket

        return f"{socket.gethostname()}:{self.pid(name)}"

    def kill(self, name: str) -> float:
        """SIGKILL (no cleanup, no ack); the monotonic time of the kill."""
        proc = self.children.procs.pop(name)
        proc.kill()
        killed = time.monotonic()
        proc.wait()
        return killed

    def supervise(self, queue: str, first: str) -> Callable[[], str]:
        """Restarts the worker whenever it dies, as compose's restart policy would; returns current()."""
        stop = threading.Event()
        current = {"name": first}

        def loop() -> None:
            while not stop.wait(0.1):
                proc = self.children.procs.get(current["name"])
                if proc is not None and proc.poll() is not None:
                    self.deaths.append((current["name"], time.monotonic()))
                    self.children.procs.pop(current["name"], None)
                    current["name"] = self.start_worker(queue, wait=False)

        thread = threading.Thread(target=loop, name=f"supervisor-{first}", daemon=True)
        thread.start()
        self._supervisors.append((stop, thread))
        return lambda: current["name"]

    def stop(self) -> None:
        """Stops every process: SIGTERM to all at once, SIGKILL to whatever is left after a few seconds."""
        for stop, _ in self._supervisors:
            stop.set()
        for _, thread in self._supervisors:
            thread.join(10)  # a restart in progress finishes starting its process, which is stopped below
        procs = list(self.children.procs.values())
        self.children.procs.clear()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- logs ---------------------------------------------------------------------------------------------

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_logs(self) -> list[str]:
        return [p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log"))]

    def audit(self) -> Audit:
        return Audit.read(self.worker_logs())

    # -- the API ------------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> str:
        answer = httpx.post(f"{self.base_url}/v1/generations", json=body, timeout=30)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def submit_many(self, count: int, max_tokens: int, prefix: str = "job") -> list[str]:
        return [
            self.submit({"prompt": f"{prefix} {i}: Hello there", "max_tokens": max_tokens, "temperature": 0})
            for i in range(count)
        ]

    def publish(self, kind: str, job_id: str, times: int = 1) -> None:
        """Sends the job's Celery message again (as a redelivery or a duplicate would)."""
        from shared.celery_app import TASKS, make_celery
        from shared.settings import Settings

        app = make_celery(Settings(broker_url=self.redis.url, data_dir=Path(self.env["LLMQ_DATA_DIR"])))
        try:
            with app.producer_or_acquire() as producer:
                for _ in range(times):
                    app.send_task(TASKS[kind], args=[job_id], queue=kind, producer=producer)
        finally:
            app.close()


def assert_exactly_once(system: ChaosSystem, ids: list[str], *, max_claims: int | None = None) -> dict[str, Any]:
    """Every job terminal; each succeeded or failed-by-a-worker job's outcome written exactly once,
    by the attempt the row holds; no job claimed by more attempts than the row counts. The rows."""
    rows = system.jobs.rows(ids)
    assert set(rows) == set(ids), "jobs missing from the database"
    not_terminal = {i: r["status"] for i, r in rows.items() if r["status"] not in TERMINAL}
    assert not not_terminal, f"jobs not terminal: {not_terminal}"
    audit = system.audit()
    for job_id, row in rows.items():
        writes = audit.writes.get(job_id, [])
        if not writes and (row["attempt"], row["status"]) in audit.unknown.get(job_id, []):
            writes = [(row["attempt"], row["status"])]  # its commit landed though the worker saw it fail
        claims = audit.claims.get(job_id, [])
        # Each claim is a distinct attempt (a conditional UPDATE can hand out an attempt only once).
        assert len(claims) == len(set(claims)), f"{job_id}: an attempt was claimed twice: {claims}"
        assert max(claims, default=0) <= row["attempt"], f"{job_id}: claimed attempt beyond the row: {claims}"
        if row["status"] == "succeeded":
            assert writes == [(row["attempt"], "succeeded")], f"{job_id}: writes {writes}, row attempt {row['attempt']}"
            assert row["result"] and row["result"]["outputs"], f"{job_id}: succeeded without outputs"
        elif row["status"] == "failed" and (row["error"] or {}).get("code") != "max_attempts_exceeded":
            assert writes == [(row["attempt"], "failed")], f"{job_id}: writes {writes}"
        else:
            assert writes == [], f"{job_id}: {row['status']} but a worker wrote {writes}"
        if max_claims is not None:
            assert len(claims) <= max_claims, f"{job_id}: claimed {len(claims)} times"
    return rows
