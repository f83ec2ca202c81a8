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
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from systems import fresh_database, start_system  # bench/systems.py

from shared.migrate import upgrade  # the repo root is on sys.path once bench/systems.py is imported

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
    """A table row per max_tokens for a gateway and a generate worker started on env."""
    system = start_system({**env, "LLMQ_DATA_DIR": str(data)}, data / "logs")
    rows = []
    try:
        for n in tokens:
            total, run = run_jobs(system.base_url, jobs, n)
            p50 = statistics.median(total) * 1000
            p50_run = statistics.median(run) * 1000
            worst = max(total) * 1000
            rows.append(f"| {name} | {n} | {jobs} | {p50:.1f} | {worst:.1f} | {p50_run:.1f} |")
    finally:
        system.children.stop_all()
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
    # The systems get none of this process's LLMQ_* variables: unset URLs mean the embedded default.
    common = {"LLMQ_BASE_MODEL": str(args.model), "HF_HUB_OFFLINE": "1"}

    embedded = tmp / "embedded"
    embedded.mkdir()
    upgrade(f"sqlite:///{embedded / 'llmq.db'}")
    rows = measure("embedded (SQLite + file broker)", common, embedded, args.jobs, args.max_tokens)

    with fresh_database("llmq_bench") as url:
        env = common | {"LLMQ_DATABASE_URL": url, "LLMQ_BROKER_URL": REDIS}
        rows += measure("Postgres + Redis", env, tmp / "prod", args.jobs, args.max_tokens)

    print(f"\nmodel: {args.model}\n")
    print("| deployment | max_tokens | jobs | p50 end-to-end ms | max ms | p50 worker run ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
