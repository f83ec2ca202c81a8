"""End-to-end time of one generation job, on the embedded default and on Postgres + Redis.

Starts a gateway and a generate worker for each deployment (real processes), submits jobs one at a
time with ?wait, and reports submit -> terminal latency next to the model time the worker measured.

    python bench/job_latency.py [--jobs 20] [--max-tokens 1 16] [--model DIR]

Needs Postgres and Redis for the second deployment (LLMQ_TEST_DATABASE_URL / LLMQ_TEST_REDIS_URL,
defaults as in the tests). Uses the tiny offline GPT-2 unless --model names a directory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.processes import Children, gateway_command, wait_ready, worker_command
from shared.migrate import upgrade

PG = os.environ.get("LLMQ_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("LLMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def run_jobs(base_url: str, jobs: int, max_tokens: int) -> tuple[list[float], list[float]]:
    """(end-to-end seconds, worker run seconds) of each job, run one after another."""
    prompt = "Below is an instruction that describes a task."
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        warm = client.post("/v1/generations", json=body).json()  # waits out the worker's model load
        client.get(f"/v1/generations/{warm['id']}", params={"wait": 60})
        total, run = [], []
        for _ in range(jobs):
            started = time.perf_counter()
            job = client.post("/v1/generations", json=body).json()
            job = client.get(f"/v1/generations/{job['id']}", params={"wait": 30}).json()
            total.append(time.perf_counter() - started)
            assert job["status"] == "succeeded", job
            run.append(job["run_seconds"])
    return total, run


def measure(name: str, env: dict[str, str], data: Path, jobs: int, tokens: list[int]) -> list[str]:
    port = 18000 + secrets.randbelow(1000)
    children = Children(env={**os.environ, **env, "LLMQ_DATA_DIR": str(data)}, log_dir=data / "logs")
    rows = []
    try:
        children.start("gateway", gateway_command("127.0.0.1", port))
        children.start("worker", worker_command("generate"))
        wait_ready(f"http://127.0.0.1:{port}", children)
        for n in tokens:
            total, run = run_jobs(f"http://127.0.0.1:{port}", jobs, n)
            p50 = statistics.median(total) * 1000
            p50_run = statistics.median(run) * 1000
            worst = max(total) * 1000
            rows.append(f"| {name} | {n} | {jobs} | {p50:.1f} | {worst:.1f} | {p50_run:.1f} |")
    finally:
        children.stop_all()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    if args.model is None:
        from worker.model_factory import build_tiny_gpt2

        args.model = build_tiny_gpt2(tmp / "tiny-gpt2")
    common = {"LLMQ_BASE_MODEL": str(args.model), "HF_HUB_OFFLINE": "1"}
    for key in ("LLMQ_DATABASE_URL", "LLMQ_BROKER_URL"):
        os.environ.pop(key, None)

    embedded = tmp / "embedded"
    upgrade(f"sqlite:///{embedded / 'llmq.db'}") if embedded.mkdir() is None else None
    rows = measure("embedded (SQLite + file broker)", common, embedded, args.jobs, args.max_tokens)

    db = f"llmq_bench_{secrets.token_hex(4)}"
    admin = PG.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = f"{PG.rpartition('/')[0]}/{db}"
    try:
        upgrade(url)
        env = common | {"LLMQ_DATABASE_URL": url, "LLMQ_BROKER_URL": REDIS}
        rows += measure("Postgres + Redis", env, tmp / "prod", args.jobs, args.max_tokens)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    print(f"\nmodel: {args.model}\n")
    print("| deployment | max_tokens | jobs | p50 end-to-end ms | max ms | p50 worker run ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
