"""Chaos on the train side: the train worker is killed with SIGKILL mid-training; a new worker resumes the
fine-tune from its last complete checkpoint, so at most one checkpoint interval of steps is done again."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from shared import artifacts
from shared.artifacts import ADAPTER_SEAL, CHECKPOINT_SEAL, ArtifactStore
from shared.settings import Settings
from tests.chaos.harness import ChaosSystem, record_recovery, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "worker" / "data" / "alpaca_sample.jsonl"
MAX_STEPS, SAVE_EVERY = 16, 4


def complete_checkpoints(system: ChaosSystem, job_id: str, attempt: int) -> list[int]:
    """Steps of one attempt's checkpoints sealed in the artifact store (the seal is written last)."""
    settings = Settings(data_dir=Path(system.env["LLMQ_DATA_DIR"]))
    store = ArtifactStore.from_settings(settings)
    keys = store.sealed(artifacts.checkpoint_pattern(job_id, attempt), CHECKPOINT_SEAL)
    return sorted(int(key.rsplit("-", 1)[1]) for key in keys)


def progress_steps(system: ChaosSystem, job_id: str, attempt: int) -> list[int]:
    """Steps of the progress events one attempt wrote (read from the database: the API has no attempt)."""
    with psycopg.connect(system.jobs.dsn) as conn:
        rows = conn.execute(
            "SELECT data FROM job_events WHERE job_id = %s AND attempt = %s AND type = 'metrics' ORDER BY id",
            (job_id, attempt),
        ).fetchall()
    return [int(data["step"]) for (data,) in rows if data and "train_loss" in data]


def test_train_worker_killed_mid_training_resumes_from_its_last_checkpoint(
    chaos_env: Callable[..., ChaosSystem], tiny_model: Path
) -> None:
    # A longer lease than the generate tests' 3 s, kept from when the train side renewed only between
    # optimizer steps (a heartbeat thread holds it now); the figures below are measured with it.
    system = chaos_env(lease_seconds="15")
    (first,) = system.start_with_workers(queue="train")
    api = system.base_url

    uploaded = httpx.post(
        f"{api}/v1/files", files={"file": ("alpaca.jsonl", SAMPLE.read_bytes())}, data={"purpose": "fine-tune"}
    )
    assert uploaded.status_code == 200, uploaded.text
    hyperparameters = {
        "max_steps": MAX_STEPS, "save_every_steps": SAVE_EVERY, "batch_size": 4, "learning_rate": 2e-3,
        "max_seq_len": 128, "lora_dropout": 0.0, "validation_split": 0.0,
    }  # fmt: skip
    created = httpx.post(
        f"{api}/v1/fine_tuning/jobs",
        json={
            "model": str(tiny_model),
            "training_file": uploaded.json()["id"],
            "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        },
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    def recorded() -> list[int]:
        answer = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}/checkpoints", timeout=10).json()
        return sorted(c["step_number"] for c in answer["data"])

    wait_for(recorded, 300, "the first checkpoint", interval=0.05)
    killed_at = system.kill(first)
    recorded_at_kill, on_disk_at_kill = recorded(), complete_checkpoints(system, job_id, 1)
    first_attempt = progress_steps(system, job_id, 1)
    assert max(on_disk_at_kill) < MAX_STEPS, "training finished before the kill"
    system.start_worker("train")
    wait_for(lambda: progress_steps(system, job_id, 2), 300, "attempt 2 to train", interval=0.2)
    record_recovery("6. train worker kill -9 mid-training", "kill -> training again (lease 15 s, resumed)",
                    time.monotonic() - killed_at)  # fmt: skip
    done_at = system.jobs.wait_terminal([job_id], timeout=400)
    record_recovery("6. train worker kill -9 mid-training", f"kill -> fine-tune succeeded ({MAX_STEPS} steps)",
                    done_at - killed_at)  # fmt: skip

    job = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}").json()
    row = system.jobs.rows([job_id])[job_id]
    assert job["status"] == "succeeded", job
    assert row["attempt"] == 2
    events: list[dict[str, Any]] = httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    resumes = [m for e in events if (m := re.fullmatch(r"Resuming from the checkpoint at step (\d+)\.", e["message"]))]
    assert len(resumes) == 1, [e["message"] for e in events]
    resumed = int(resumes[0].group(1))
    # It resumed from the newest complete checkpoint there was when the worker died (recorded or not yet).
    assert resumed == max(on_disk_at_kill) >= max(recorded_at_kill)
    second_attempt = progress_steps(system, job_id, 2)
    assert second_attempt and min(second_attempt) > resumed and max(second_attempt) == MAX_STEPS
    # What was done twice: the steps between that checkpoint and the kill, at most one interval (a step's
    # progress is written before its checkpoint, so a kill during the save redoes the whole interval).
    reached = max([*first_attempt, max(on_disk_at_kill)])
    assert reached - resumed <= SAVE_EVERY
    assert job["result_files"] or job["fine_tuned_model"], job
    # Attempt 2 read attempt 1's checkpoint but wrote its own; the adapter is in attempt 2's folder.
    assert complete_checkpoints(system, job_id, 2)[-1] == MAX_STEPS
    store = ArtifactStore.from_settings(Settings(data_dir=Path(system.env["LLMQ_DATA_DIR"])))
    assert store.is_sealed(artifacts.adapter_key(job_id, 2), ADAPTER_SEAL), job
    assert not store.exists(artifacts.adapter_key(job_id, 1))
    # Every listed checkpoint is in the store (rotated-out ones are no longer listed), and attempt 2's are listed.
    listed = {c["step_number"] for c in httpx.get(f"{api}/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]}
    second_on_disk = set(complete_checkpoints(system, job_id, 2))
    assert second_on_disk <= listed <= second_on_disk | set(complete_checkpoints(system, job_id, 1)), listed
    print(f"attempt 1 reached step >= {reached}; attempt 2 resumed at {resumed} and trained to {MAX_STEPS}")

    # A late duplicate of the job's message (a redelivery) finds it finished and changes nothing.
    system.publish("train", job_id, times=2)
    wait_for(lambda: system.log("worker-train-2").count("nothing to do") >= 2, 60, "the duplicates to be no-ops")
    assert system.jobs.rows([job_id])[job_id] == row
