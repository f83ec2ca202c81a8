"""Chaos on a batch: a worker killed with SIGKILL while it runs a batch's requests. Real processes (a gateway
and two Celery workers, both started up front so that nobody waits for a model load after the kill); the
batch must complete with every request answered once."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.chaos.harness import ChaosSystem, assert_exactly_once, record_recovery, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

Make = Callable[..., ChaosSystem]
REQUESTS = 16


def batch_jobs(system: ChaosSystem, batch_id: str) -> list[str]:
    with psycopg.connect(system.jobs.dsn, connect_timeout=3) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs WHERE batch_id = %s", (batch_id,))]


def test_worker_killed_mid_batch_loses_no_request_and_answers_each_custom_id_once(chaos_env: Make) -> None:
    system = chaos_env(max_batch_size="4")
    first, _ = system.start_with_workers(2)
    model = system.env["LLMQ_BASE_MODEL"]
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(REQUESTS)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    api = httpx.Client(base_url=f"{system.base_url}/v1", timeout=30)
    uploaded = api.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", content)}).json()
    created = api.post("/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions"})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    ids = batch_jobs(system, batch_id)
    assert len(ids) == REQUESTS

    # Freeze the worker and look: if it holds some of the batch's requests, kill -9 it there (as in
    # test_generate_chaos's mid-batch kill); otherwise let it go on and look again.
    worker, pid = system.worker_id(first), system.pid(first)

    def frozen_mid_batch() -> list[str]:
        os.kill(pid, signal.SIGSTOP)
        rows = system.jobs.rows(ids)
        held = [i for i, r in rows.items() if r["status"] == "running" and r["worker"] == worker]
        if not held:
            os.kill(pid, signal.SIGCONT)
        return held

    started = time.monotonic()
    victims = wait_for(frozen_mid_batch, 30, "the batch's requests to be running", interval=0.01)
    killed_at = system.kill(first)  # the other worker takes its requests once their lease lapses

    def ended() -> dict[str, object] | None:
        batch = api.get(f"/batches/{batch_id}").json()
        return batch if batch["status"] in ("completed", "failed", "cancelled", "expired") else None

    try:
        batch = wait_for(ended, 40, "the batch to end", interval=0.2)
    except AssertionError:
        statuses = [(r["status"], r["attempt"]) for r in system.jobs.rows(ids).values()]
        raise AssertionError(f"batch not ended: {api.get(f'/batches/{batch_id}').json()}; jobs {statuses}") from None
    record_recovery("batch: worker kill -9 mid-batch", f"kill -> batch of {REQUESTS} completed",
                    time.monotonic() - killed_at)  # fmt: skip
    assert batch["status"] == "completed", batch
    assert time.monotonic() - started < 60
    assert batch["request_counts"] == {"total": REQUESTS, "completed": REQUESTS, "failed": 0}
    output = api.get(f"/files/{batch['output_file_id']}/content").text.splitlines()
    answers = [json.loads(line) for line in output]
    assert sorted(a["custom_id"] for a in answers) == sorted(f"c{i}" for i in range(REQUESTS))  # each once
    assert all(a["response"]["status_code"] == 200 for a in answers)
    assert batch["error_file_id"] is None

    rows = assert_exactly_once(system, ids)
    audit = system.audit()
    for job_id in victims:  # the kill lost their first run: claimed again, written once, by attempt 2
        # (the killed worker may have been frozen between its claim's commit and its log line)
        assert rows[job_id]["attempt"] == 2 and audit.claims[job_id][-1] == 2
