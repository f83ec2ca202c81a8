"""The gateway's front door under wrk: submits, polls and a mix, the landed gateway and this one side by side.

    python bench/front_door.py [--seconds 15] [--connections 32] [--gateway-workers 2]
                               [--baseline REF | --no-baseline] [--scenarios submit,poll,mixed]
                               [--submit-rate 500] [--tenants 50] [--py-spy DIR]

wrk (Debian's `apt-get install -y wrk`, a compiled load generator: the client costs little of the 2 cores)
drives each gateway with a Lua script generated here:

- **submit**: POST /v1/generations, one short prompt, max_tokens 1, keys taken in turn;
- **poll**: GET /v1/generations/{id} (no ?wait=) of jobs submitted before the run, each with its tenant's key;
- **mixed**: 1 submit : 4 polls;
- **submit@500** (`--submit-rate`, 500 by default, 0 for none): submits offered at a constant 500/s, each wrk thread
  sending its share on a fixed schedule (a request waits for its slot, wrk's `delay()`; a slot already past when a
  connection is free is taken at once, so a gateway that cannot keep up gets less, not a burst). Its p99 is the
  latency at that load; the saturated runs' p99 is mostly the wait behind the other connections' requests.
  Any scenario can be paced the same way: `--scenarios poll@2000,mixed@1500`.

Each gateway gets its own fresh Postgres database (LLMQ_TEST_DATABASE_URL's server, created and dropped) and its
own Redis database (LLMQ_FRONT_DOOR_REDIS_URL, default redis://127.0.0.1:6379/13 for this gateway and the next
database for the baseline, both flushed), runs as its production command (uvicorn, --gateway-workers processes)
with API keys required, the default rate limit (6,000 requests a minute per key) and the default per-tenant
quota (1,000 active jobs; its count runs on every submit), with --tenants keys of as many tenants so that no run
reaches a quota. No worker runs: jobs stay queued.

The baseline is the gateway of the git ref --baseline (default: the commit before issue 13's work), extracted
with `git archive` to a temporary folder and run from there with this virtual environment. Both gateways run
during the whole run; the scenarios alternate between them (submit on one, submit on the other, ...), so that
the machine's other load falls on both alike. Reported per scenario and gateway: requests/s, p50/p99 latency
(wrk's), non-2xx answers and socket errors, and the gateway processes' CPU (psutil) in ms per request; then the
ratios new / baseline. Afterwards each gateway's database must hold exactly as many jobs as its broker queue holds
messages (one message per committed job). --py-spy DIR records raw stacks of the gateways' worker processes
during each scenario.

--end-to-end adds the scenario **e2e** after the others: each gateway gets a generate worker (Celery, a real
process, started then) on the tiny GPT-2 (worker.model_factory.build_tiny_gpt2, built once into --cache-dir),
wrk submits 1-token jobs for --seconds, and the run waits until every job is finished; reported are the jobs
that succeeded per second from the first job's creation to the last one's end (and the failed ones). The
gateways then run on the tiny model from the start (LLMQ_BASE_MODEL), so the earlier scenarios' jobs queue for
it too: the worker starts with that backlog, which the e2e figure leaves out (only jobs created in its window
count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg
import redis
from measure import cpu_times, cpu_used, loadavg, log, machine, start_py_spy, stop_py_spy  # bench/measure.py
from systems import free_port, fresh_database  # bench/systems.py

from cli.processes import gateway_command, wait_ready, worker_command
from shared.api_keys import create_key
from shared.db import make_engine

ROOT_DIR = Path(__file__).resolve().parent.parent
LANDED = "2587164"  # main before issue 13 (the front door at full speed)
REDIS = os.environ.get("LLMQ_FRONT_DOOR_REDIS_URL", "redis://127.0.0.1:6379/13")
POLL_JOBS = 400  # jobs submitted before the runs, polled by the poll and mixed scenarios

LUA = """
local mode = "%(mode)s"
local interval = %(interval)d  -- microseconds between this thread's requests; 0: each as soon as the last answered
local keys = {%(keys)s}
local polls = {%(polls)s}
local counter = 0
local tid = 0
if interval > 0 then
  -- A constant-rate schedule: each request of this thread claims the next slot, interval after the one before,
  -- and its connection waits until then (a slot already past is taken now: no burst to catch up).
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } llmq_timespec;
    int clock_gettime(int clock, llmq_timespec *now);
  ]]
  local now = ffi.new("llmq_timespec")
  local next_slot = 0
  function delay()
    ffi.C.clock_gettime(1, now)  -- CLOCK_MONOTONIC
    local us = tonumber(now.tv_sec) * 1000000 + tonumber(now.tv_nsec) / 1000
    if next_slot < us then next_slot = us end
    local wait = next_slot - us
    next_slot = next_slot + interval
    return math.floor(wait / 1000 + 0.5)
  end
end
function setup(thread)
  tid = tid + 1
  thread:set("tid", tid)
end
function init(args)
  counter = tid * 7919
end
local submits = 0
local function submit()
  -- keys in turn by this thread's submits, not by its requests: in the mixed run every fifth request submits,
  -- and keys[counter %% #keys] would give every submit to a fifth of the tenants (their quota reached)
  submits = submits + 1
  local body = '{"prompt":"say something ' .. counter .. '","max_tokens":1}'
  local key = keys[(tid * 7919 + submits) %% #keys + 1]
  local headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
  return wrk.format("POST", "/v1/generations", headers, body)
end
local function poll()
  local p = polls[counter %% #polls + 1]
  return wrk.format("GET", "/v1/generations/" .. p[2], {["Authorization"] = "Bearer " .. keys[p[1]]})
end
function request()
  counter = counter + 1
  if mode == "submit" or (mode == "mixed" and counter %% 5 == 0) then
    return submit()
  end
  return poll()
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "non2xx": %%d, "socket": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class Gateway:
    """One gateway under test: its processes, database, Redis database and keys."""

    label: str
    source: Path
    db_url: str
    redis_url: str
    workers: int
    base_model: str = "load-test-model"
    proc: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    base_url: str = ""
    keys: list[str] = field(default_factory=list)
    polls: list[tuple[int, str]] = field(default_factory=list)  # (key index, 1-based), job id

    def start(self, log_dir: Path) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
        self.env = env = {
            **inherited,
            "PYTHONPATH": str(self.source),
            "LLMQ_DATABASE_URL": self.db_url,
            "LLMQ_BROKER_URL": self.redis_url,
            "LLMQ_DATA_DIR": str(log_dir / self.label),
            "LLMQ_BASE_MODEL": self.base_model,
            "LLMQ_REQUIRE_API_KEYS": "true",
            "LLMQ_REPUBLISH_AFTER_SECONDS": "3600",
            "LLMQ_LOG_FORMAT": "text",
        }
        output = open(log_dir / f"{self.label}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            own_gateway_command(self.source, port, self.workers), env=env, cwd=self.source, stdout=output,
            stderr=output,
        )  # fmt: skip
        wait_ready(self.base_url, timeout=90)
        time.sleep(1.0)  # the other uvicorn worker processes

    def pids(self) -> list[int]:
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            return [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]
        return [self.proc.pid]

    def stop(self) -> None:
        for proc in (self.worker, self.proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def start_worker(self, log_dir: Path) -> None:
        """A generate worker on this gateway's database and broker (same settings as the gateway)."""
        output = open(log_dir / f"{self.label}-worker.log", "ab")  # noqa: SIM115 (the child owns it)
        env = {**self.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LLMQ_TORCH_THREADS": "1"}
        self.worker = subprocess.Popen(
            worker_command("generate", f"bench-{self.label}@%h"), env=env, cwd=self.source, stdout=output,
            stderr=output,
        )  # fmt: skip

    def sql(self, query: str) -> tuple[object, ...]:
        with psycopg.connect(self.db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute(query).fetchone()
        return tuple(row) if row is not None else ()

    def make_keys(self, tenants: int) -> None:
        engine = make_engine(self.db_url)
        from sqlalchemy.orm import Session

        with Session(engine) as session:
            self.keys = [create_key(session, f"tenant-{i}").token for i in range(tenants)]
        engine.dispose()

    def seed_polls(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            for n in range(POLL_JOBS):
                k = n % len(self.keys)
                response = client.post(
                    "/v1/generations",
                    json={"prompt": f"seed {n}", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {self.keys[k]}"},
                )
                response.raise_for_status()
                self.polls.append((k + 1, response.json()["id"]))

    def check(self) -> tuple[int, int]:
        """(jobs in the database, messages in the generate queue)."""
        with psycopg.connect(self.db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute("SELECT count(*) FROM jobs").fetchone()
        return int(row[0]) if row else 0, int(redis.Redis.from_url(self.redis_url).llen("generate"))


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket: int
    cpu_ms: float  # gateway CPU per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def own_gateway_command(source: Path, port: int, workers: int) -> list[str]:
    """The gateway command line of the tree at source (its cli.processes.gateway_command: a landed tree's
    uvicorn options are its own)."""
    if source == ROOT_DIR:
        return gateway_command("127.0.0.1", port, workers)
    code = (
        "import json, sys; from cli.processes import gateway_command; "
        "print(json.dumps(gateway_command(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "127.0.0.1", str(port), str(workers)], cwd=source, capture_output=True,
        text=True, check=True, env={**os.environ, "PYTHONPATH": str(source)},
    ).stdout  # fmt: skip
    return list(json.loads(out))


def paced(scenario: str) -> tuple[str, float]:
    """(mode, offered requests/s) of a scenario name: "submit" runs as fast as answers come (rate 0),
    "submit@500" offers 500 requests/s on a constant schedule."""
    mode, _, rate = scenario.partition("@")
    return mode, float(rate or 0)


def lua_script(scenario: str, gateway: Gateway, threads: int, folder: Path) -> Path:
    mode, rate = paced(scenario)
    keys = ", ".join(f'"{k}"' for k in gateway.keys)
    polls = ", ".join(f'{{{k}, "{job}"}}' for k, job in gateway.polls)
    interval = round(threads * 1e6 / rate) if rate else 0
    path = folder / f"{gateway.label}-{scenario.replace('@', '-at-')}.lua"
    path.write_text(LUA % {"mode": mode, "interval": interval, "keys": keys, "polls": polls})
    return path


def run_wrk(gateway: Gateway, scenario: str, args: argparse.Namespace, folder: Path) -> Result:
    script = lua_script(scenario, gateway, args.threads, folder)
    mode = scenario.replace("@", "-at-")
    command = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.seconds:.0f}s", "--timeout", "10s",
        "-s", str(script), gateway.base_url,
    ]  # fmt: skip
    spies = []
    if args.py_spy is not None:
        workers = gateway.pids()[1:] or gateway.pids()
        spies = [start_py_spy(pid, args.py_spy / f"{gateway.label}-{mode}-{pid}.txt", rate=100) for pid in workers]
    before = cpu_times(gateway.pids())
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        stop_py_spy(spies)
    cpu = cpu_used(before, cpu_times(gateway.pids()))
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    requests = max(int(raw["requests"]), 1)
    return Result(
        requests=requests,
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        non2xx=raw["non2xx"],
        socket=raw["socket"],
        cpu_ms=cpu / requests * 1000,
    )


@dataclass
class EndToEnd:
    submitted: int
    succeeded: int
    failed: int
    seconds: float  # first job created -> last job finished

    @property
    def jobs_per_second(self) -> float:
        return self.succeeded / self.seconds if self.seconds > 0 else 0.0


def run_end_to_end(gateway: Gateway, args: argparse.Namespace, folder: Path) -> EndToEnd:
    """Cancels the earlier scenarios' backlog, starts the worker and waits for one job through it; then wrk
    submits 1-token jobs for --seconds, and the run waits until the worker has finished every one of them."""
    gateway.sql("UPDATE jobs SET status = 'cancelled' WHERE status = 'queued' RETURNING 1")
    redis.Redis.from_url(gateway.redis_url).delete("generate")
    gateway.start_worker(folder)
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        auth = {"Authorization": f"Bearer {gateway.keys[0]}"}
        probe = client.post("/v1/generations", json={"prompt": "warm up", "max_tokens": 1}, headers=auth).json()
        client.get(f"/v1/generations/{probe['id']}", params={"wait": 110}, headers=auth).raise_for_status()
    (since,) = gateway.sql("SELECT now()")
    run_wrk(gateway, "submit", args, folder)
    active = "status IN ('queued', 'running')"
    deadline = time.monotonic() + args.drain_seconds
    while gateway.sql(f"SELECT count(*) FROM jobs WHERE {active}")[0] and time.monotonic() < deadline:
        time.sleep(0.5)
    window = f"created_at >= '{since}'"
    submitted, succeeded, failed, seconds = gateway.sql(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'), "
        f"coalesce(extract(epoch FROM max(finished_at) - min(created_at)), 0) FROM jobs WHERE {window}"
    )
    return EndToEnd(int(submitted), int(succeeded), int(failed), float(seconds))  # type: ignore[arg-type]


def baseline_source(ref: str, into: Path) -> Path:
    """The tree of a git ref, extracted into a folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT_DIR, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@contextlib.contextmanager
def gateways(args: argparse.Namespace, folder: Path) -> Iterator[list[Gateway]]:
    sources = [("new", ROOT_DIR)]
    if not args.no_baseline:
        sources.append(("landed", baseline_source(args.baseline, folder / "landed-src")))
    base, _, db = REDIS.rpartition("/")
    with contextlib.ExitStack() as stack:
        started: list[Gateway] = []
        for i, (label, source) in enumerate(sources):
            db_url = stack.enter_context(fresh_database(f"llmq_front_{label}"))
            gateway = Gateway(label, source, db_url, f"{base}/{int(db) + i}", args.gateway_workers)
            if args.end_to_end:
                gateway.base_model = str(tiny_model(args.cache_dir))
            redis.Redis.from_url(gateway.redis_url).flushdb()
            stack.callback(redis.Redis.from_url(gateway.redis_url).flushdb)
            gateway.make_keys(args.tenants)
            stack.callback(gateway.stop)
            gateway.start(folder)
            gateway.seed_polls()
            started.append(gateway)
            log(f"{label} gateway up at {gateway.base_url} from {source}")
        yield started


def tiny_model(cache: Path) -> Path:
    from worker.model_factory import build_tiny_gpt2

    return build_tiny_gpt2(cache / "tiny-gpt2")


def report_end_to_end(runs: dict[str, EndToEnd]) -> None:
    print("\n| e2e (1-token jobs, one generate worker, tiny GPT-2) | submitted | succeeded | failed | seconds | "
          "jobs/s completed |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, run in runs.items():
        print(f"| {label} | {run.submitted} | {run.succeeded} | {run.failed} | {run.seconds:.1f} | "
              f"{run.jobs_per_second:.0f} |")  # fmt: skip
    if "landed" in runs and runs["landed"].jobs_per_second:
        print(f"\njobs/s completed new / landed: {runs['new'].jobs_per_second / runs['landed'].jobs_per_second:.1f}x")


def report(args: argparse.Namespace, results: dict[tuple[str, str], Result], labels: list[str], load: str) -> None:
    print(f"\n`python bench/front_door.py {' '.join(sys.argv[1:])}`  \nmachine: {machine()}; wrk -t{args.threads} "
          f"-c{args.connections}, {args.seconds:.0f} s per run, {args.gateway_workers} gateway processes; "
          f"baseline {args.baseline}; load average {load}\n")  # fmt: skip
    print("| scenario | gateway | offered/s | requests/s | p50 ms | p99 ms | non-2xx | socket errors | "
          "gateway CPU ms/request |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.scenarios:
        offered = paced(mode)[1]
        for label in labels:
            r = results[(mode, label)]
            print(f"| {mode} | {label} | {f'{offered:.0f}' if offered else 'max'} | {r.rps:.0f} | {r.p50_ms:.1f} | "
                  f"{r.p99_ms:.1f} | {r.non2xx} | {r.socket} | {r.cpu_ms:.2f} |")  # fmt: skip
    if "landed" not in labels:
        return
    print("\n| scenario | requests/s new / landed | p99 landed / new | CPU per request landed / new |")
    print("|---|---|---|---|")
    for mode in args.scenarios:
        new, old = results[(mode, "new")], results[(mode, "landed")]
        ratios = (new.rps / old.rps, old.p99_ms / new.p99_ms, old.cpu_ms / new.cpu_ms)
        print(f"| {mode} | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="per scenario and gateway")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--gateway-workers", type=int, default=2, help="uvicorn --workers of each gateway")
    parser.add_argument("--tenants", type=int, default=50, help="API keys (one tenant each) the requests rotate over")
    parser.add_argument("--baseline", default=LANDED, help="git ref of the landed gateway")
    parser.add_argument("--no-baseline", action="store_true", help="measure this gateway only")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=["submit", "poll", "mixed"])
    parser.add_argument(
        "--submit-rate", type=float, default=500.0,
        help="adds submit@RATE after submit: submits offered at RATE/s on a constant schedule (0: none)",
    )  # fmt: skip
    parser.add_argument("--py-spy", type=Path, default=None, help="raw py-spy stacks of each run here")
    parser.add_argument("--end-to-end", action="store_true", help="add the e2e scenario (a generate worker)")
    parser.add_argument("--drain-seconds", type=float, default=300.0, help="e2e: longest wait for the backlog")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/llmq-bench-cache"), help="the tiny model")
    args = parser.parse_args()
    paced = f"submit@{args.submit_rate:g}"
    if args.submit_rate and "submit" in args.scenarios and paced not in args.scenarios:
        args.scenarios.insert(args.scenarios.index("submit") + 1, paced)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    folder = Path(tempfile.mkdtemp(prefix="llmq-front-door-"))
    results: dict[tuple[str, str], Result] = {}
    load_start = loadavg()
    with gateways(args, folder) as started:
        for mode in args.scenarios:
            for gateway in started:
                log(f"{mode} on {gateway.label}")
                results[(mode, gateway.label)] = run_wrk(gateway, mode, args, folder)
        time.sleep(2.0)  # requests wrk left in flight finish (a commit, then its message)
        checks = {g.label: g.check() for g in started}
        end_to_end: dict[str, EndToEnd] = {}
        for gateway in started if args.end_to_end else []:
            log(f"e2e on {gateway.label}: starting its worker")
            end_to_end[gateway.label] = run_end_to_end(gateway, args, folder)
    report(args, results, [g.label for g in started], f"{load_start:.2f} -> {loadavg():.2f}")
    if end_to_end:
        report_end_to_end(end_to_end)
    failed = False
    for label, (jobs, messages) in checks.items():
        ok = jobs == messages
        failed |= not ok
        print(f"\ncheck {label}: {jobs} jobs in the database, {messages} messages queued: {'OK' if ok else 'FAILED'}")
    print(f"\nlogs in {folder}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
