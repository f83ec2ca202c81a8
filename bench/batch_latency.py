"""Interactive latency while an OpenAI batch runs, and the batch's throughput against the batching ceiling.

One run, side by side (issue 13's batch goals: interactive p50 within 1.5x of idle while a batch runs; the
batch at 0.9x or more of the in-process batching ceiling):

- **ceiling**: the batch's first prompts through `worker.generation.generate` in batches of `max_batch_size`, the
  model loaded in this process the way the worker loads it (same torch threads): no queue, no database. Best of
  three passes, run alone before the system starts and again after it stops; the batch is held to the higher.
- **idle**: gateway + generate worker (real processes, Postgres + Redis); one client sends `/v1/completions`
  one after another (`--interactive`); p50 and p90 of the end-to-end time.
- **during the batch**: a batch of `--requests` lines (the same prompts, `/v1/completions`) is created; while it
  runs the same client sends the same interactive requests, and the run ends when the batch is `completed`.
  Only interactive requests sent while batch requests were still queued count. The batch's throughput is its
  completion tokens from its first request's start to its last one's end (read from the job rows).

    python bench/batch_latency.py                      # tiny offline GPT-2: about 1 to 2 minutes on 2 cores
    python bench/batch_latency.py --requests 10000 --model DIR --quantization nf4   # the issue's scale

Needs Postgres (LLMQ_TEST_DATABASE_URL, a fresh database per run) and Redis (LLMQ_BENCH_REDIS_URL, default
redis://127.0.0.1:6379/12, flushed). Uses the tiny offline GPT-2 unless --model names a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
from measure import log, machine, pct  # bench/measure.py
from systems import fresh_database, start_system  # bench/systems.py

from cli.processes import threads_per_worker

CEILING_PASSES = 3
LOAD = [0.0]  # the load average when the run started
REDIS = os.environ.get("LLMQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def prompts(count: int) -> list[str]:
    """count distinct prompts of about the same length."""
    topics = ["the sea", "a mountain", "the city", "a forest", "the sky", "a river", "the desert", "a garden"]
    return [f"Request {i}: write one sentence about {topics[i % len(topics)]}." for i in range(count)]


@dataclass
class Ceiling:
    requests: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def ceiling(model: str, quantization: str, texts: list[str], max_tokens: int, batch: int, threads: int) -> Ceiling:
    """The in-process batching ceiling: the prompts in batches of `batch` through generate(), greedy, on as many
    torch threads as the worker."""
    import torch

    from worker.generation import Request, SamplingParams, generate
    from worker.model_loading import load_base_model

    torch.set_num_threads(threads)
    loaded = load_base_model(model, "main", quantization, "cpu")  # type: ignore[arg-type]
    greedy = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    generate(loaded, [Request(p, greedy) for p in texts[:batch]])  # warm
    passes = []
    for _ in range(CEILING_PASSES):  # the best pass: a neighbour's burst on a shared machine only slows one
        tokens, started = 0, time.perf_counter()
        for start in range(0, len(texts), batch):
            chunk = [Request(p, greedy) for p in texts[start : start + batch]]
            tokens += sum(g.completion_tokens for g in generate(loaded, chunk))
        passes.append(Ceiling(len(texts), tokens, time.perf_counter() - started))
    return max(passes, key=lambda c: c.tokens_per_s)


@dataclass
class Interactive:
    """Sequential interactive completions; each one's (start, seconds)."""

    client: httpx.Client
    body: dict[str, object]
    samples: list[tuple[float, float, str]] = field(default_factory=list)  # (start, seconds, job id)

    def one(self) -> None:
        started = time.perf_counter()
        answer = self.client.post("/completions", json=self.body)
        assert answer.status_code == 200, answer.text
        self.samples.append((started, time.perf_counter() - started, answer.json()["id"]))

    def until(self, stop: threading.Event, most: int, gap: float = 0.0) -> None:
        """One request after another (gap seconds apart: a user reading the answer) until stop or most sent."""
        while not stop.is_set() and len(self.samples) < most:
            self.one()
            stop.wait(gap)


def batch_window(db_url: str, batch_id: str) -> tuple[float, float, int, int]:
    """(first start, last finish as epoch seconds, completion tokens, requests) of a batch's jobs."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)),"
            " coalesce(sum((result->'usage'->>'completion_tokens')::int), 0), count(*)"
            " FROM jobs WHERE batch_id = %s AND status = 'succeeded'",
            (batch_id,),
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1]), int(row[2]), int(row[3])


def waits(db_url: str, ids: list[str]) -> tuple[list[float], list[float]]:
    """(queued seconds: created to claimed, running seconds: claimed to finished) of jobs."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM started_at - created_at), extract(epoch FROM finished_at - started_at)"
            " FROM jobs WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    return [float(r[0]) for r in rows], [float(r[1]) for r in rows]


def queued_batch_requests(db_url: str, batch_id: str) -> int:
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        query = "SELECT count(*) FROM jobs WHERE batch_id = %s AND status = 'queued'"
        row = conn.execute(query, (batch_id,)).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="lines of the batch")
    parser.add_argument("--interactive", type=int, default=12, help="interactive requests idle, and at most during")
    parser.add_argument(
        "--interactive-gap",
        type=float,
        default=0.0,
        help="seconds between one interactive answer and the next request while the batch runs (0: none, so an "
        "interactive job is nearly always in flight)",
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the worker and the ceiling")
    parser.add_argument("--reserved-rows", type=int, default=4, help="LLMQ_BATCH_RESERVED_ROWS of the worker")
    parser.add_argument(
        "--beside-interactive",
        type=int,
        default=0,
        help="LLMQ_BATCH_ROWS_BESIDE_INTERACTIVE of the worker (0, the default: interactive_slowdown decides)",
    )
    parser.add_argument(
        "--interactive-slowdown",
        type=float,
        default=1.25,
        help="LLMQ_INTERACTIVE_SLOWDOWN of the worker (1.25, the default; 0: every batch row decodes beside "
        "interactive jobs)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=threads_per_worker(0, workers=2),
        help="LLMQ_TORCH_THREADS of the worker, and the ceiling's threads (default: half the cores, as llmq up gives "
        "each of its two workers)",
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--quantization", default="fp32", choices=["nf4", "int8", "bf16", "fp32"])
    args = parser.parse_args()
    LOAD[0] = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llmq-bench-batch-"))
    if args.model is None:
        from worker.model_factory import build_tiny_gpt2

        args.model = build_tiny_gpt2(tmp / "tiny-gpt2")
    texts = prompts(args.requests)

    subset = texts[: args.batch * 3]
    log(f"ceiling: {len(subset)} prompts in batches of {args.batch}")
    best = ceiling(str(args.model), args.quantization, subset, args.max_tokens, args.batch, args.torch_threads)
    log(f"ceiling before: {best.tokens} tokens in {best.seconds:.1f} s = {best.tokens_per_s:.0f} tokens/s")

    redis.Redis.from_url(REDIS).flushdb()
    with fresh_database("llmq_bench_batch") as url:
        env = {
            "LLMQ_DATABASE_URL": url,
            "LLMQ_BROKER_URL": REDIS,
            "LLMQ_DATA_DIR": str(tmp / "data"),
            "LLMQ_BASE_MODEL": str(args.model),
            "LLMQ_QUANTIZATION": args.quantization,
            "LLMQ_MAX_BATCH_SIZE": str(args.batch),
            "LLMQ_BATCH_RESERVED_ROWS": str(args.reserved_rows),
            "LLMQ_TORCH_THREADS": str(args.torch_threads),
            "LLMQ_BATCH_ROWS_BESIDE_INTERACTIVE": str(args.beside_interactive),
            "LLMQ_INTERACTIVE_SLOWDOWN": str(args.interactive_slowdown),
            "LLMQ_RATE_LIMIT_PER_MINUTE": "0",
            "LLMQ_REAPER_INTERVAL_SECONDS": "0.5",
            "HF_HUB_OFFLINE": "1",
        }
        system = start_system(env, tmp / "logs")
        try:
            run = run_system(system.base_url, url, args, texts)
        finally:
            system.children.stop_all()
    after = ceiling(str(args.model), args.quantization, subset, args.max_tokens, args.batch, args.torch_threads)
    log(f"ceiling after: {after.tokens} tokens in {after.seconds:.1f} s = {after.tokens_per_s:.0f} tokens/s")
    report(args, best, after, run)


@dataclass
class SystemRun:
    idle: list[float]
    during: list[float]
    idle_split: tuple[list[float], list[float]]  # (queued, running) seconds of each
    during_split: tuple[list[float], list[float]]
    batch_seconds: float
    batch_tokens: int
    batch_requests: int
    wall: float


def run_system(base_url: str, db_url: str, args: argparse.Namespace, texts: list[str]) -> SystemRun:
    body = {"model": str(args.model), "prompt": texts[0], "max_tokens": args.max_tokens, "temperature": 0}
    with httpx.Client(base_url=f"{base_url}/v1", timeout=120) as client:
        client.post("/completions", json=body)  # waits out the worker's model load
        idle = Interactive(client, body)
        for _ in range(args.interactive):
            idle.one()
        log(f"idle: p50 {statistics.median(s for _, s, _ in idle.samples) * 1000:.0f} ms")

        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body | {"prompt": text}}
            for i, text in enumerate(texts)
        ]
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = client.post("/files", data={"purpose": "batch"}, files={"file": ("batch.jsonl", content)}).json()
        started = time.perf_counter()
        batch = client.post("/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions"}).json()
        log(f"batch {batch['id']}: {len(texts)} requests created in {time.perf_counter() - started:.1f} s")

        during = Interactive(httpx.Client(base_url=f"{base_url}/v1", timeout=120), body)
        stop = threading.Event()
        sender = threading.Thread(target=during.until, args=(stop, args.interactive, args.interactive_gap), daemon=True)
        sender.start()
        queued_until = time.perf_counter()
        while (state := client.get(f"/batches/{batch['id']}").json())["status"] not in ("completed", "failed"):
            if queued_batch_requests(db_url, batch["id"]) > 0:
                queued_until = time.perf_counter()
            time.sleep(0.25)
        wall = time.perf_counter() - started
        stop.set()
        sender.join()
        assert state["request_counts"]["completed"] == len(texts), state
        first, last, tokens, requests = batch_window(db_url, batch["id"])
        counted = [(s, job) for t, s, job in during.samples if t < queued_until]
        log(f"batch done in {wall:.1f} s; {len(counted)} interactive requests sent while it had requests queued")
    idle_split = waits(db_url, [job for _, _, job in idle.samples])
    during_split = waits(db_url, [job for _, job in counted])
    idle_seconds, during_seconds = [s for _, s, _ in idle.samples], [s for s, _ in counted]
    return SystemRun(idle_seconds, during_seconds, idle_split, during_split, last - first, tokens, requests, wall)


def report(args: argparse.Namespace, before: Ceiling, after: Ceiling, run: SystemRun) -> None:
    best = max(before, after, key=lambda c: c.tokens_per_s)  # the batch is held to the higher of the two

    def latency(samples: list[float]) -> str:
        if not samples:
            return "none sent"
        return f"{statistics.median(samples) * 1000:.0f} ms (p90 {pct(samples, 90) * 1000:.0f})"

    def split(pair: tuple[list[float], list[float]]) -> str:
        queued, running = pair
        if not queued:
            return "none"
        return f"{statistics.median(queued) * 1000:.0f} ms / {statistics.median(running) * 1000:.0f} ms"

    idle_p50 = statistics.median(run.idle)
    during_p50 = statistics.median(run.during) if run.during else float("nan")
    batch_rate = run.batch_tokens / run.batch_seconds
    batch = f"{run.batch_seconds:.1f} s first start to last finish ({run.wall:.1f} s create to completed)"
    rows = [
        (f"interactive p50 idle ({len(run.idle)} requests)", latency(run.idle), ""),
        (f"interactive p50 while the batch runs ({len(run.during)} requests)", latency(run.during), ""),
        ("ratio during / idle", f"{during_p50 / idle_p50:.2f}x", "at most 1.5x"),
        ("interactive p50 queued / running, idle", split(run.idle_split), ""),
        ("interactive p50 queued / running, while the batch runs", split(run.during_split), ""),
        (
            f"batch: {run.batch_requests} requests, {run.batch_tokens} tokens",
            f"{batch} = {batch_rate:.0f} tokens/s",
            "",
        ),
        (
            f"ceiling: generate() in batches of {args.batch}, in process, best of {CEILING_PASSES} passes before / "
            "after the system run",
            f"{before.tokens_per_s:.0f} / {after.tokens_per_s:.0f} tokens/s ({best.tokens} tokens in "
            f"{best.seconds:.2f} s)",
            "",
        ),
        ("ratio batch / ceiling", f"{batch_rate / best.tokens_per_s:.2f}x", "at least 0.9x"),
    ]
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.1f} at the end ({LOAD[0]:.1f} at the start)")
    print(f"model {args.model} ({args.quantization}), {args.max_tokens} new tokens, max_batch_size {args.batch}, "
          f"batch_reserved_rows {args.reserved_rows}, batch_rows_beside_interactive {args.beside_interactive}, "
          f"interactive_slowdown {args.interactive_slowdown}, "
          f"torch threads {args.torch_threads}, interactive gap {args.interactive_gap} s\n")  # fmt: skip
    print("| measure | value | goal |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
