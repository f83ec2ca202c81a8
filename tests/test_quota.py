"""The per-tenant active-job quota holds under simultaneous submits, through a real gateway process, on
Postgres and on SQLite, for every route that creates a job (generations, completions, fine-tuning jobs)."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.servers import redis_db
from tests.systems import System, start_system

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"
QUOTA = 5
SUBMITS = 50
BASE = "quota-test-base"  # no worker serves it: every accepted job stays queued


@pytest.fixture(params=["postgres", "sqlite"])
def quota_system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[System, str]]:
    """A gateway (no worker) with a quota of 5 active jobs per tenant; (system, database URL)."""
    from shared.migrate import upgrade

    if request.param == "postgres":
        database = request.getfixturevalue("postgres_url")
        broker = redis_db(10)
        redis.Redis.from_url(broker).flushdb()
    else:
        database = f"sqlite:///{tmp_path / 'llmq.db'}"
        upgrade(database)
        broker = ""  # the embedded file broker
    env = {"LLMQ_DATABASE_URL": database, "LLMQ_DATA_DIR": str(tmp_path), "LLMQ_BASE_MODEL": BASE,
           "LLMQ_REQUIRE_API_KEYS": "true", "LLMQ_MAX_ACTIVE_JOBS_PER_TENANT": str(QUOTA),
           "LLMQ_COMPLETION_TIMEOUT_SECONDS": "600"}  # fmt: skip
    if broker:
        env["LLMQ_BROKER_URL"] = broker
    system = start_system(env, tmp_path / "logs", queues=())
    yield system, database
    system.children.stop_all()


def test_quota_of_five_holds_under_fifty_simultaneous_submits_on_every_creating_route(
    quota_system: tuple[System, str],
) -> None:
    from shared.api_keys import create_key
    from shared.db import make_engine
    from shared.models import Job

    system, database = quota_system
    engine = make_engine(database)
    tenant = f"quota-{secrets.token_hex(4)}"  # a tenant of this test alone, on a shared database
    with Session(engine) as session:
        key = {"Authorization": f"Bearer {create_key(session, tenant, 'test').token}"}
    upload = httpx.post(f"{system.base_url}/v1/files", headers=key, files={"file": ("a.jsonl", SAMPLE.read_bytes())},
                        data={"purpose": "fine-tune"})  # fmt: skip
    assert upload.status_code == 200, upload.text
    requests = [
        ("/v1/generations", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/fine_tuning/jobs", {"model": BASE, "training_file": upload.json()["id"]}),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2}),
    ]
    start = threading.Barrier(SUBMITS)
    answers: list[httpx.Response | None] = [None] * SUBMITS

    def submit(i: int) -> None:
        path, body = requests[i % len(requests)]
        with httpx.Client(base_url=system.base_url, headers=key, timeout=8) as client:
            start.wait()
            # An accepted completion waits for a worker that never comes: its answer stays None.
            with contextlib.suppress(httpx.ReadTimeout):
                answers[i] = client.post(path, json=body)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(SUBMITS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with Session(engine) as session:
        created = session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant))
    refused = [a for a in answers if a is not None and a.status_code == 429]
    assert created == QUOTA
    assert len(refused) == SUBMITS - QUOTA, [(a.status_code, a.text[:200]) if a else None for a in answers]
    assert all(int(a.headers["retry-after"]) > 0 for a in refused)
    assert all(a.json()["error"]["code"] == "rate_limit_exceeded" for a in refused)
    accepted = [a for a in answers if a is None or a.status_code != 429]
    assert all(a is None or a.status_code in (200, 202) for a in accepted), [a.text for a in accepted if a]
