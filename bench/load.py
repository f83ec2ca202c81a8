"""Load test of the gateway over loopback: many users submitting generation jobs and polling their status.

    python bench/load.py [--users 50] [--seconds 60] [--polls-per-submit 20] [--gateway-workers 1]
                         [--client-procs 1] [--py-spy DIR] [--url http://host:port]

Each user (an asyncio task with an httpx client) repeats: POST /v1/generations (one short prompt), then
--polls-per-submit GET /v1/generations/{id} (no ?wait=), for --seconds after a --warmup that is not counted.
Users are spread over --client-procs processes. Reported: submits/s, polls/s, p50/p99 latency of each, errors
(any other status, or a transport error), the load average at start and end, and the CPU seconds of gateway,
clients, Postgres backends and Redis. Afterwards every job a 202 answered is looked up in the database (the run
fails if one is missing), and the broker queue's length is printed next to it (one message per job).

No worker runs: jobs stay queued, so the figures are the gateway's (plus Postgres and Redis), not the model's,
and no worker competes for the cores. The gateway runs as its production command (uvicorn, --gateway-workers
processes) on a fresh Postgres database (LLMQ_TEST_DATABASE_URL's server; created and dropped) and a Redis
database no worker consumes (LLMQ_LOAD_REDIS_URL, default redis://127.0.0.1:6379/11, flushed). The per-tenant
active-job quota stays on (its COUNT runs on every submit) but is set above what a run can submit, and the
reaper does not re-send the backlog's messages during the run (republish_after_seconds = 1 hour).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis
from measure import cpu_times, cpu_used, loadavg, log, machine, ms, pct, start_py_spy, stop_py_spy  # bench/measure.py
from systems import System, admin_dsn, fresh_database, postgres_backends, start_system  # bench/systems.py

REDIS = os.environ.get("LLMQ_LOAD_REDIS_URL", "redis://127.0.0.1:6379/11")
QUOTA = 10**9  # the quota query runs on every submit, but never refuses one


# ---------------------------------------------------------------------------------------------- clients


@dataclass
class Tally:
    """What one client process saw inside the measured window."""

    submit_latencies: list[float] = field(default_factory=list)
    poll_latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    job_ids: list[str] = field(default_factory=list)  # every job a 202 answered, warm-up included
    first_start: float = math.inf
    last_end: float = 0.0
    cpu_seconds: float = 0.0  # of the client processes, in the window

    def merge(self, other: Tally) -> None:
        self.submit_latencies += other.submit_latencies
        self.poll_latencies += other.poll_latencies
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count
        self.job_ids += other.job_ids
        self.first_start = min(self.first_start, other.first_start)
        self.last_end = max(self.last_end, other.last_end)
        self.cpu_seconds += other.cpu_seconds


async def _users(base_url: str, users: range, polls: int, measure_from: float, until: float) -> Tally:
    tally = Tally()

    def note_error(kind: str) -> None:
        tally.errors[kind] = tally.errors.get(kind, 0) + 1

    async def timed(
        client: httpx.AsyncClient, method: str, url: str, latencies: list[float], **kw: Any
    ) -> httpx.Response | None:
        start = time.time()
        try:
            response = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            if start >= measure_from:
                note_error(type(exc).__name__)
            return None
        end = time.time()
        if start >= measure_from:
            latencies.append(end - start)
            tally.first_start = min(tally.first_start, start)
            tally.last_end = max(tally.last_end, end)
        return response

    async def user(k: int) -> None:
        # A client (one keep-alive connection) per user: one shared pool of 50 connections costs the load
        # generator twice the CPU per request (httpx scans its pool on every request).
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            await user_loop(client, k)

    async def user_loop(client: httpx.AsyncClient, k: int) -> None:
        n = 0
        while time.time() < until:
            n += 1
            body = {"prompt": f"user {k} job {n}: say something", "max_tokens": 8}
            response = await timed(client, "POST", "/v1/generations", tally.submit_latencies, json=body)
            if response is None:
                continue
            if response.status_code != 202:
                note_error(f"POST {response.status_code}")
                continue
            job_id = response.json()["id"]
            tally.job_ids.append(job_id)
            for _ in range(polls):
                if time.time() >= until:
                    return
                response = await timed(client, "GET", f"/v1/generations/{job_id}", tally.poll_latencies)
                if response is None:
                    continue
                if response.status_code != 200 or response.json()["id"] != job_id:
                    note_error(f"GET {response.status_code}")

    async def cpu_from_window_start() -> float:
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        return time.process_time()

    window_cpu = asyncio.create_task(cpu_from_window_start())
    await asyncio.gather(*(user(k) for k in users))
    tally.cpu_seconds = time.process_time() - await window_cpu
    return tally


def _client_process(base_url: str, users: range, polls: int, measure_from: float, until: float) -> Tally:
    return asyncio.run(_users(base_url, users, polls, measure_from, until))


def run_clients(
    base_url: str, users: int, procs: int, polls: int, warmup: float, seconds: float, at_window: Callable[[], None]
) -> Tally:
    """users spread over procs processes; the measured window starts warmup seconds from now (at_window then)."""
    start = time.time() + 1.0  # time for the processes to start
    measure_from, until = start + warmup, start + warmup + seconds
    bounds = [round(users * i / procs) for i in range(procs + 1)]
    shares = [(base_url, range(bounds[i], bounds[i + 1]), polls, measure_from, until) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        result = pool.starmap_async(_client_process, shares)
        time.sleep(max(0.0, measure_from - time.time()))
        at_window()
        tallies = result.get()
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return total


# ---------------------------------------------------------------------------------------------- system


def gateway_pids(root: int) -> list[int]:
    """The gateway process and (with --workers) its worker processes."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(root)
        return [root, *(child.pid for child in proc.children(recursive=True))]
    return [root]


def postgres_sessions(db_url: str) -> int:
    """Sessions ever opened on the database (pg_stat_database.sessions, Postgres 14+); -1 if unknown."""
    name = db_url.rpartition("/")[2]
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        try:
            row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
        except psycopg.Error:
            return -1
    return int(row[0]) if row else -1


def postgres_exited_cpu(backends: Sequence[int]) -> float:
    """CPU seconds of the postmaster's exited children (backends of every database that closed so far)."""
    for pid in backends:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(psutil.Process(pid).ppid()).cpu_times()
            return times.children_user + times.children_system
    return 0.0


def redis_pids() -> list[int]:
    """The Redis server this run uses (when it runs on this machine)."""
    with contextlib.suppress(redis.RedisError, KeyError):
        return [int(redis.Redis.from_url(REDIS).info("server")["process_id"])]
    return []


def verify(db_url: str, job_ids: list[str]) -> tuple[int, int, int]:
    """(jobs a 202 answered, of those found in the database, messages in the broker's generate queue)."""
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        found = conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchone()
    messages = int(redis.Redis.from_url(REDIS).llen("generate"))
    return len(job_ids), int(found[0]) if found else 0, messages


# ---------------------------------------------------------------------------------------------- report


def server_stack() -> str:
    """What uvicorn runs on here: httptools and uvloop when importable (uvicorn[standard]), else h11 and asyncio."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {http} + {loop}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window")
    parser.add_argument("--polls-per-submit", type=int, default=20)
    parser.add_argument("--gateway-workers", type=int, default=1, help="uvicorn --workers of the gateway")
    parser.add_argument("--client-procs", type=int, default=1, help="processes the users are spread over")
    parser.add_argument("--py-spy", type=Path, default=None, help="record raw py-spy stacks of the gateway here")
    parser.add_argument("--url", default=None, help="load an already running gateway (no CPU figures, no check)")
    args = parser.parse_args()

    load_start = loadavg()
    if args.url:
        sys.exit(measure_load(args, args.url, None, load_start))
    with fresh_database("llmq_load") as db_url:
        redis.Redis.from_url(REDIS).flushdb()
        data = Path(tempfile.mkdtemp(prefix="llmq-load-"))
        env = {
            "LLMQ_DATABASE_URL": db_url,
            "LLMQ_BROKER_URL": REDIS,
            "LLMQ_DATA_DIR": str(data),
            "LLMQ_BASE_MODEL": "load-test-model",
            "LLMQ_MAX_ACTIVE_JOBS_PER_TENANT": str(QUOTA),
            "LLMQ_REPUBLISH_AFTER_SECONDS": "3600",
        }
        system = start_system(env, data / "logs", queues=(), gateway_workers=args.gateway_workers)
        log(f"gateway up at {system.base_url} ({args.gateway_workers} worker process(es)), logs in {data / 'logs'}")
        try:
            code = measure_load(args, system.base_url, system, load_start)
        finally:
            system.children.stop("gateway", signal.SIGINT)
            redis.Redis.from_url(REDIS).flushdb()
    sys.exit(code)


def measure_load(args: argparse.Namespace, base_url: str, ours: System | None, load_start: float) -> int:
    """Runs the users against base_url and prints the report; the exit code (1 on errors or a missing job).

    ours: the system this run started, for CPU figures and the database check; None for --url.
    """
    command = "python bench/load.py " + " ".join(sys.argv[1:])
    pids: dict[str, list[int]] = {}
    if ours is not None:
        time.sleep(1.0)  # let uvicorn's worker processes start
        pids = {"gateway": gateway_pids(ours.pid("gateway")), "redis": redis_pids()}
    before: dict[str, dict[int, float]] = {}

    sessions, exited = [0, 0], [0.0, 0.0]

    def at_window() -> None:
        if ours is not None:
            pids["postgres"] = postgres_backends(ours.db_url)  # the pool has grown during the warm-up
            sessions[0], exited[0] = postgres_sessions(ours.db_url), postgres_exited_cpu(pids["postgres"])
        before.update({name: cpu_times(group) for name, group in pids.items()})

    spies: list[subprocess.Popen[bytes]] = []
    if args.py_spy is not None and ours is not None:
        seconds = args.warmup + args.seconds + 1
        spies = [
            start_py_spy(pid, args.py_spy / f"gateway-{pid}.txt", rate=50, seconds=seconds)
            for pid in pids["gateway"][1:] or pids["gateway"]
        ]
    log(f"{args.users} users over {args.client_procs} process(es), {args.warmup:.0f} s warm-up, "
        f"{args.seconds:.0f} s measured")  # fmt: skip
    load_before = loadavg()
    try:
        tally = run_clients(
            base_url, args.users, args.client_procs, args.polls_per_submit, args.warmup, args.seconds, at_window
        )
    finally:
        stop_py_spy(spies)
    load_after = loadavg()
    wall = max(tally.last_end - tally.first_start, 1e-9)
    if ours is not None:
        pids["postgres"] = postgres_backends(ours.db_url)
        sessions[1], exited[1] = postgres_sessions(ours.db_url), postgres_exited_cpu(pids["postgres"])
    cpu = {name: cpu_used(before[name], cpu_times(group)) for name, group in pids.items()}
    if ours is not None:  # backends that closed during the run (any database's: other load shows here)
        cpu["postgres"] += exited[1] - exited[0]
    cpu["clients"] = tally.cpu_seconds

    submits, polls = len(tally.submit_latencies), len(tally.poll_latencies)
    errors = sum(tally.errors.values())
    print(f"\n`{command}`  \nmachine: {machine()}, {server_stack()}; load average {load_start:.2f} at start, "
          f"{load_before:.2f} -> {load_after:.2f} over the run\n")  # fmt: skip
    print("| users | polls/submit | gateway workers | seconds | submits/s | submit p50 / p99 ms | polls/s | "
          "poll p50 / p99 ms | errors | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    submit_ms = f"{ms(pct(tally.submit_latencies, 50), 1)} / {ms(pct(tally.submit_latencies, 99), 1)}"
    poll_ms = f"{ms(pct(tally.poll_latencies, 50), 1)} / {ms(pct(tally.poll_latencies, 99), 1)}"
    print(
        f"| {args.users} | {args.polls_per_submit} | {args.gateway_workers} | {wall:.1f} | "
        f"{submits / wall:.0f} | {submit_ms} | {polls / wall:.0f} | {poll_ms} | "
        f"{errors} | {load_before:.2f} -> {load_after:.2f} |"
    )
    if tally.errors:
        print("\nerrors: " + ", ".join(f"{kind} x{count}" for kind, count in sorted(tally.errors.items())))
    requests = max(submits + polls, 1)
    used = ", ".join(
        f"{name} {seconds:.1f} s ({seconds / wall:.2f} cores, {seconds / requests * 1000:.2f} ms/request)"
        for name, seconds in cpu.items()
    )
    print(f"\nCPU during the run: {used}")
    if ours is None:
        return 1 if errors else 0
    print(f"\nPostgres sessions opened during the run: {sessions[1] - sessions[0]} (pool churn when > 0)")
    answered, found, messages = verify(ours.db_url, tally.job_ids)
    ok = answered == found
    print(
        f"\ncheck: {answered} jobs answered 202 (warm-up included), {found} of them in the database: "
        f"{'OK' if ok else 'FAILED'}; {messages} messages in the broker's generate queue"
        + ("" if messages == answered else " (not one per job: did something else use this Redis db?)")
    )
    return 1 if errors or not ok else 0


if __name__ == "__main__":
    main()
