"""Chaos on the generate side: workers killed mid-batch, Redis and Postgres lost, duplicate and hostile
messages, a job that kills its worker. Real processes throughout; each test checks the invariant that
every submitted job reaches a terminal state and has its outcome written exactly once."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.chaos.harness import ChaosSystem, PostgresCluster, assert_exactly_once, record_recovery, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

Make = Callable[..., ChaosSystem]


def running_on(system: ChaosSystem, ids: list[str], worker: str) -> list[str]:
    return [i for i, r in system.jobs.rows(ids).items() if r["status"] == "running" and r["worker"] == worker]


def test_worker_killed_mid_batch_every_job_completes_exactly_once(chaos_env: Make) -> None:
    system = chaos_env(max_batch_size="8")
    (first,) = system.start_with_workers()
    ids = system.submit_many(40, max_tokens=64)

    # Freeze the worker (SIGSTOP) and look: if it holds a batch, it is frozen in the middle of it, so
    # kill -9 it there; otherwise let it go on and look again. A batch may take 0.1 s or 5 s on this
    # machine depending on its load; freezing first makes "mid-batch" certain either way.
    worker, pid = system.worker_id(first), system.pid(first)

    def frozen_mid_batch() -> list[str]:
        os.kill(pid, signal.SIGSTOP)
        batch = running_on(system, ids, worker)
        if not batch:
            os.kill(pid, signal.SIGCONT)
        return batch

    victims = wait_for(frozen_mid_batch, 60, "a batch to be running", interval=0.01)
    killed_at = system.kill(first)
    assert set(running_on(system, ids, worker)) == set(victims)
    system.start_worker()
    victims_done_at = system.jobs.wait_terminal(victims, timeout=240)
    record_recovery("1. generate worker kill -9 mid-batch", f"kill -> the killed batch ({len(victims)} jobs) terminal",
                    victims_done_at - killed_at)  # fmt: skip
    done_at = system.jobs.wait_terminal(ids, timeout=240)
    record_recovery("1. generate worker kill -9 mid-batch", "kill -> all 40 jobs terminal",
                    done_at - killed_at)  # fmt: skip

    rows = assert_exactly_once(system, ids)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    audit = system.audit()
    for job_id in victims:  # ran twice (the kill lost the first run), written once, by attempt 2
        assert rows[job_id]["attempt"] == 2 and audit.claims[job_id] == [1, 2]
    assert all(rows[i]["attempt"] == 1 for i in ids if i not in victims)


def test_redis_restarted_empty_with_100_jobs_queued_all_reach_a_terminal_state(chaos_env: Make) -> None:
    system = chaos_env()
    system.start_gateway()
    ids = system.submit_many(100, max_tokens=4)  # no worker yet: every message waits in Redis
    assert system.redis.queue_length("generate") >= 100

    system.redis.restart_empty()  # kill -9 and start again without persistence: every message is gone
    killed_at = time.monotonic()
    worker = system.start_worker()
    done_at = system.jobs.wait_terminal(ids, timeout=180)
    record_recovery("2. Redis kill -9, restarted empty", "restart -> 100 queued jobs terminal (incl. worker start)",
                    done_at - killed_at)  # fmt: skip

    rows = assert_exactly_once(system, ids, max_claims=1)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert all(r["attempt"] == 1 for r in rows.values())
    # The messages that made it happen came from the reaper's lost-message repair.
    assert "re-sent messages of" in system.log("gateway")

    # Again with the worker running: it reconnects by itself and serves new jobs.
    system.redis.restart_empty()
    restarted_at = time.monotonic()
    more = system.submit_many(10, max_tokens=4, prefix="after")
    done_at = system.jobs.wait_terminal(more, timeout=120)
    record_recovery("2. Redis kill -9, restarted empty", "restart with the worker running -> 10 new jobs terminal",
                    done_at - restarted_at)  # fmt: skip
    rows = assert_exactly_once(system, ids + more, max_claims=1)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert system.children.procs[worker].poll() is None


def test_postgres_crash_mid_run_answers_503_then_no_job_stays_running(
    chaos_env: Make, pg_cluster: PostgresCluster
) -> None:
    system = chaos_env(max_batch_size="8")
    (worker,) = system.start_with_workers()
    ids = system.submit_many(30, max_tokens=32)
    wid = system.worker_id(worker)
    wait_for(lambda: running_on(system, ids, wid), 60, "a batch to be running")

    pg_cluster.crash()  # immediate shutdown: every connection dies, like a crash
    down_at = time.monotonic()
    for path in ("/v1/jobs", "/readyz", f"/v1/generations/{ids[-1]}"):
        answer = httpx.get(f"{system.base_url}{path}", timeout=15)
        assert answer.status_code == 503, (path, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert "Traceback" not in answer.text and "psycopg" not in answer.text
        body = answer.json()
        if path == "/readyz":
            assert body["checks"]["database"].startswith("unreachable") and body["checks"]["broker"] == "ok"
        else:
            assert body["error"]["code"] == "database_unavailable"
    created = httpx.post(f"{system.base_url}/v1/generations", json={"prompt": "x", "max_tokens": 1}, timeout=15)
    assert created.status_code == 503 and created.json()["error"]["code"] == "database_unavailable"
    time.sleep(max(0.0, 3 - (time.monotonic() - down_at)))  # down for a whole lease

    pg_cluster.start()
    up_at = time.monotonic()
    wait_for(lambda: httpx.get(f"{system.base_url}/readyz", timeout=5).status_code == 200, 30, "readyz 200 again")
    done_at = system.jobs.wait_terminal(ids, timeout=180)
    record_recovery("3. Postgres crash (down ~3 s) mid-run", "Postgres back -> 30 jobs terminal", done_at - up_at)

    rows = assert_exactly_once(system, ids)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, {i: r["error"] for i, r in rows.items()}
    assert system.children.procs[worker].poll() is None  # the worker rode it out
    # The system takes new work again.
    system.assert_serves_new_work()


def test_a_generate_worker_holds_its_message_while_the_database_is_down_instead_of_spending_the_queue(
    chaos_env: Make, pg_cluster: PostgresCluster
) -> None:
    system = chaos_env()
    (worker,) = system.start_with_workers()
    pg_cluster.crash()
    system.publish("generate", "gen-sent-during-the-outage", times=5)
    wait_for(lambda: "database unreachable" in system.log(worker), 30, "the worker to notice the outage")
    time.sleep(2)  # several retries of the worker's wait
    assert system.redis.queue_length("generate") == 4  # one message held by the waiting task, none spent

    pg_cluster.start()
    wait_for(lambda: "database reachable again" in system.log(worker), 60, "the worker to see the database")
    wait_for(lambda: system.redis.queue_length("generate") == 0, 30, "the held-back messages to be served")
    assert system.children.procs[worker].poll() is None
    system.assert_serves_new_work()


def test_same_job_delivered_three_times_to_two_workers_runs_once(chaos_env: Make) -> None:
    system = chaos_env(max_batch_size="4")
    workers = system.start_with_workers(2)
    ids = system.submit_many(20, max_tokens=8)  # one message each from the gateway
    for job_id in ids:
        system.publish("generate", job_id, times=2)  # and two duplicates: three deliveries of every id
    started = time.monotonic()
    done_at = system.jobs.wait_terminal(ids, timeout=120)
    record_recovery("4. every message delivered 3x, 2 workers", "20 jobs terminal (no recovery needed)",
                    done_at - started)  # fmt: skip

    rows = assert_exactly_once(system, ids, max_claims=1)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert all(r["attempt"] == 1 for r in rows.values())
    audit = system.audit()
    assert all(audit.claims[i] == [1] for i in ids)

    def received() -> int:
        return sum(system.log(name).count("] received") for name in workers)

    wait_for(lambda: received() >= 60, 60, "every duplicate to be delivered")  # each found nothing left to do
    assert all(r["attempt"] == 1 for r in system.jobs.rows(ids).values())
    busy = [name for name in workers if "claimed" in system.log(name)]
    print(f"workers that claimed jobs: {len(busy)} of 2; messages delivered: {received()}")


POISON = "__chaos: this prompt kills its worker__"


def test_poison_job_ends_failed_after_max_attempts_while_other_jobs_keep_flowing(chaos_env: Make) -> None:
    system = chaos_env(max_batch_size="4", max_attempts="3", fault_kill_on_prompt=POISON)
    first = system.start_with_workers(2)
    for name in first:
        system.supervise("generate", name)  # restarts a worker whenever it dies, like restart: always

    before = system.submit_many(3, max_tokens=8, prefix="before")
    poison = system.submit({"prompt": POISON, "max_tokens": 8, "temperature": 0})
    before += system.submit_many(3, max_tokens=8, prefix="before")
    wait_for(lambda: system.deaths, 60, "the poison job to kill a worker")
    first_death = system.deaths[0][1]

    # Keep submitting while the poison job is retried and its workers restart.
    during: list[str] = []
    while system.jobs.status_of([poison])[poison] not in ("failed", "succeeded"):
        assert time.monotonic() - first_death < 240, "the poison job never ended"
        during.append(system.submit({"prompt": f"during {len(during)}", "max_tokens": 8, "temperature": 0}))
        time.sleep(0.5)
    quarantined_at = time.monotonic()
    ids = [*before, poison, *during]
    done_at = system.jobs.wait_terminal(ids, timeout=180)
    record_recovery("5. poison job (SIGKILLs its worker), 2 workers", "first crash -> poison failed",
                    quarantined_at - first_death)  # fmt: skip
    record_recovery("5. poison job (SIGKILLs its worker), 2 workers", "first crash -> every job terminal",
                    done_at - first_death)  # fmt: skip

    rows = assert_exactly_once(system, ids)
    assert rows[poison]["status"] == "failed" and rows[poison]["attempt"] == 3
    assert rows[poison]["error"]["code"] == "max_attempts_exceeded"
    assert len(system.deaths) == 3  # one crash per attempt: after the first, it ran alone
    others = [i for i in ids if i != poison]
    assert {rows[i]["status"] for i in others} == {"succeeded"}
    # Batch neighbours of the first crash ran again, alone, and succeeded; nobody else ran twice.
    assert all(rows[i]["attempt"] <= 2 for i in others)
    # Work kept flowing while the poison job was being retried: between its first crash and its failure
    # other jobs finished (its batch neighbours, run alone, and jobs submitted meanwhile), and every job
    # submitted during the retries succeeded.
    poison_end = rows[poison]["finished_at"]
    died = datetime.now(UTC) - timedelta(seconds=time.monotonic() - first_death)
    served = [i for i in others if died < rows[i]["finished_at"] < poison_end]
    assert served, "no other job finished while the poison job was being retried"
    print(f"{len(served)} other jobs finished between the first crash and the poison job's failure")


class _Tripwire:
    """Unpickling this creates a file: proof that a message was deserialized with pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def pickle_envelope(task: str, queue: str, args: list[object]) -> str:
    """A Celery (protocol 2) message with a pickle body, as kombu stores it in a Redis list."""
    task_id = str(uuid.uuid4())
    body = pickle.dumps((args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary",
            "content-type": "application/x-python-serialize",
            "headers": {
                "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
                "retries": 0, "eta": None, "expires": None, "timelimit": [None, None], "argsrepr": "(...)",
                "kwargsrepr": "{}", "origin": "chaos-test", "ignore_result": True,
            },
            "properties": {
                "correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": queue}, "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )  # fmt: skip


def test_pickle_message_pushed_into_redis_is_refused_and_the_worker_keeps_serving(
    chaos_env: Make, tmp_path: Path
) -> None:
    system = chaos_env()
    (worker,) = system.start_with_workers()
    tripwire = tmp_path / "unpickled"
    with system.redis.client() as client:
        client.lpush("generate", pickle_envelope("llmq.generate", "generate", [_Tripwire(str(tripwire))]))
    wait_for(lambda: "untrusted content" in system.log(worker), 30, "the worker to refuse the message")
    assert "application/x-python-serialize" in system.log(worker)
    assert system.redis.queue_length("generate") == 0  # consumed and dropped, not requeued forever

    (job,) = system.submit_many(1, max_tokens=4, prefix="after pickle")
    system.jobs.wait_terminal([job], timeout=60)
    assert system.jobs.status_of([job]) == {job: "succeeded"}
    assert not tripwire.exists(), "the pickle body was deserialized"
    assert system.children.procs[worker].poll() is None


def test_stream_of_a_job_whose_worker_is_killed_mid_generation_matches_the_final_text(
    chaos_env: Make, tiny_model: Path
) -> None:
    system = chaos_env()
    (worker,) = system.start_with_workers()
    body = {"model": str(tiny_model), "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    streamed, job_id, chunks = "", "", 0
    with httpx.stream("POST", f"{system.base_url}/v1/completions", json=body, timeout=180) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            job_id = event["id"]
            for choice in event["choices"]:
                streamed += choice["text"]
            chunks += 1
            if chunks == 5:  # some text is out: kill -9 the worker and start another
                system.kill(worker)
                system.start_worker()
    final = httpx.get(f"{system.base_url}/v1/generations/{job_id}").json()
    assert final["status"] == "succeeded" and final["attempt"] == 2
    assert streamed == final["outputs"][0]["text"]


def test_submission_while_redis_is_down_tells_the_client_whether_the_job_exists(chaos_env: Make) -> None:
    system = chaos_env()
    system.start_gateway()
    system.redis.kill()
    answer = httpx.post(f"{system.base_url}/v1/generations", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    rows = system.jobs.rows()
    # Either the job exists and the client is told so (202), or it does not and the client gets a JSON 503.
    if rows:
        assert answer.status_code == 202, (answer.status_code, answer.text)
        assert answer.json()["id"] in rows
    else:
        assert answer.status_code == 503 and answer.json()["error"]["code"]
