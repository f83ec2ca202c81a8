"""Graceful drain on the train side: SIGTERM mid-fine-tune saves a checkpoint at the current step, hands the job
back to the queue at once (not after the lease) and exits within drain_seconds; another worker resumes from
exactly that step, so no step is lost or done twice. Worker health along the way: /v1/workers lists the
worker and its job, /readyz names the kind with no live worker, a queued job shows its queue position and
that no train worker is alive."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.harness import ChaosSystem, record_recovery, wait_for
from tests.chaos.test_train_chaos import SAMPLE, complete_checkpoints, progress_steps

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

MAX_STEPS = 8
DRAIN_SECONDS = 30


@pytest.mark.timeout(600)
def test_sigterm_mid_fine_tune_checkpoints_hands_back_and_another_worker_resumes_with_no_step_lost(
    chaos_env: Callable[..., ChaosSystem], tiny_model: Path
) -> None:
    system = chaos_env(lease_seconds="60", drain_seconds=str(DRAIN_SECONDS), worker_heartbeat_seconds="0.5",
                       worker_stale_seconds="3")  # fmt: skip
    (first,) = system.start_with_workers(queue="train")
    api = system.base_url

    wait_for(lambda: [w for w in httpx.get(f"{api}/v1/workers").json()["data"] if w["live"]], 30, "a heartbeat")
    ready = httpx.get(f"{api}/readyz").json()
    assert ready["status"] == "degraded" and ready["checks"]["workers"] == "degraded: no live generate worker"

    uploaded = httpx.post(
        f"{api}/v1/files", files={"file": ("alpaca.jsonl", SAMPLE.read_bytes())}, data={"purpose": "fine-tune"}
    )
    hyperparameters = {
        "max_steps": MAX_STEPS, "save_every_steps": MAX_STEPS, "batch_size": 2, "learning_rate": 2e-3,
        "max_seq_len": 64, "lora_dropout": 0.0, "validation_split": 0.0,
    }  # fmt: skip
    created = httpx.post(
        f"{api}/v1/fine_tuning/jobs",
        json={"model": str(tiny_model), "training_file": uploaded.json()["id"], "seed": 7,
              "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    wait_for(lambda: progress_steps(system, job_id, 1), 300, "attempt 1 to train", interval=0.05)
    (listed,) = [w for w in httpx.get(f"{api}/v1/workers").json()["data"] if w["kind"] == "train"]
    assert listed["current_jobs"] == [job_id] and listed["pid"] == system.pid(first)

    proc = system.children.procs.pop(first)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    proc.wait(DRAIN_SECONDS + 5)
    exited = time.monotonic() - signalled
    assert exited < DRAIN_SECONDS, exited
    # Handed back at once: queued now, without waiting out the 60 s lease.
    row = system.jobs.rows([job_id])[job_id]
    assert row["status"] == "queued" and row["attempt"] == 1 and row["max_attempts"] == 4, row
    record_recovery("11. train worker SIGTERM mid-training", "SIGTERM -> checkpoint saved, job queued, exited",
                    exited)  # fmt: skip

    # No live train worker now: the job says where it stands and that nothing will run it yet.
    wait_for(lambda: not httpx.get(f"{api}/v1/workers").json()["data"], 10, "the worker to deregister")
    queued = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}").json()
    assert queued["queue"] == {"position": 1, "live_workers": 0, "worker_alive": False}, queued
    assert "no live generate or train worker" in httpx.get(f"{api}/readyz").json()["checks"]["workers"]

    events: list[dict[str, Any]] = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    handed = [
        m for e in events if (m := re.fullmatch(r"Worker stopping: job handed back at step (\d+).*", e["message"]))
    ]
    assert len(handed) == 1, [e["message"] for e in events]
    stopped_at = int(handed[0].group(1))
    assert 0 < stopped_at < MAX_STEPS
    # The checkpoint is at the very step training stopped (the periodic ones would be every MAX_STEPS).
    assert complete_checkpoints(system, job_id, 1) == [stopped_at]

    started = time.monotonic()
    system.start_worker("train")
    done_at = system.jobs.wait_terminal([job_id], timeout=400)
    record_recovery("11. train worker SIGTERM mid-training", "new worker -> fine-tune succeeded", done_at - started)
    job = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    events = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    resumes = [m for e in events if (m := re.fullmatch(r"Resuming from the checkpoint at step (\d+)\.", e["message"]))]
    assert [int(m.group(1)) for m in resumes] == [stopped_at]
    second = progress_steps(system, job_id, 2)
    assert second and min(second) > stopped_at and max(second) == MAX_STEPS
    assert max(progress_steps(system, job_id, 1)) <= stopped_at  # nothing attempt 1 did is done again
