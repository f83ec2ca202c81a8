"""The gateway's hot paths on the event loop (gateway/front_door.py, gateway/pg.py, gateway/publish.py): the message
it publishes is the one Celery sends, a revoked key stops within key_cache_seconds, a broker that is down loses
no job, and the asyncpg paths answer like the SQLAlchemy ones (real Postgres and Redis)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import delete

from tests.process_settings import configure

BASE = "test-base-model"


def test_published_message_is_the_message_celery_sends(quiet_redis_url: str) -> None:
    from gateway.publish import Publisher, broker_client, publish
    from shared.celery_app import TASKS, make_celery
    from shared.settings import Settings

    queue = redis.Redis.from_url(quiet_redis_url)
    queue.delete("generate")
    make_celery(Settings(broker_url=quiet_redis_url)).send_task(TASKS["generate"], args=["gen-1"], queue="generate")
    theirs = json.loads(queue.rpop("generate") or b"")

    async def ours_published() -> bool:
        client = broker_client(quiet_redis_url)
        assert client is not None
        try:
            return await publish(Publisher(client), "generate", "gen-1")
        finally:
            await client.aclose()

    assert asyncio.run(ours_published())
    ours = json.loads(queue.rpop("generate") or b"")
    assert ours.keys() == theirs.keys()
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    per_message = {"id", "root_id", "origin", "correlation_id", "delivery_tag", "reply_to"}
    for part in ("headers", "properties"):
        assert ours[part].keys() == theirs[part].keys()
        assert {k: v for k, v in ours[part].items() if k not in per_message} == {
            k: v for k, v in theirs[part].items() if k not in per_message
        }
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")
    }


def test_publish_to_a_broker_that_is_down_answers_false_without_raising() -> None:
    from gateway.publish import Publisher, broker_client, publish

    async def published() -> bool:
        client = broker_client("redis://127.0.0.1:1/0")
        assert client is not None
        try:
            return await publish(Publisher(client), "generate", "gen-1")
        finally:
            await client.aclose()

    assert asyncio.run(published()) is False


def test_pooled_publishing_sends_simultaneous_messages_together_in_order(quiet_redis_url: str) -> None:
    from gateway.publish import Publisher, broker_client, publish

    queue = redis.Redis.from_url(quiet_redis_url)
    queue.delete("generate")
    before = int(queue.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))

    async def publish_fifty() -> list[bool]:
        client = broker_client(quiet_redis_url)
        assert client is not None
        publisher = Publisher(client)
        try:
            return list(await asyncio.gather(*(publish(publisher, "generate", f"gen-{i}") for i in range(50))))
        finally:
            await client.aclose()

    assert asyncio.run(publish_fifty()) == [True] * 50  # each answer waited for its own message
    lpushes = int(queue.info("commandstats")["cmdstat_lpush"]["calls"]) - before
    assert lpushes < 50  # fewer round trips than messages
    consumed = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in queue.lrange("generate", 0, -1)]
    assert consumed[::-1] == [f"gen-{i}" for i in range(50)]  # a worker pops them in the order they came


def test_pooled_publishing_to_a_broker_that_is_down_answers_false_for_each() -> None:
    from gateway.publish import Publisher, broker_client, publish

    async def published() -> list[bool]:
        client = broker_client("redis://127.0.0.1:1/0")
        assert client is not None
        publisher = Publisher(client)
        try:
            return list(await asyncio.gather(*(publish(publisher, "generate", f"gen-{i}") for i in range(3))))
        finally:
            await client.aclose()

    assert asyncio.run(published()) == [False] * 3


@pytest.fixture
def client(
    postgres_url: str, quiet_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    configure(
        monkeypatch,
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model=BASE,
        data_dir=str(tmp_path),
        require_api_keys="true",
        key_cache_seconds="0.5",
        max_active_jobs_per_tenant="3",
    )
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import ApiKey, Job

    with get_sessionmaker()() as session:
        for table in (Job, ApiKey):
            session.execute(delete(table))
        session.commit()
    redis.Redis.from_url(quiet_redis_url).delete("generate")
    with TestClient(create_app()) as test_client:
        assert test_client.app.state.front_door.pg is not None  # type: ignore[attr-defined]
        yield test_client


def _key(tenant: str) -> tuple[str, dict[str, str]]:
    from shared.api_keys import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        key = create_key(session, tenant, "test")
    return key.key_id, {"Authorization": f"Bearer {key.token}"}


def test_a_revoked_key_stops_working_within_key_cache_seconds(client: TestClient) -> None:
    from shared.api_keys import revoke_key
    from shared.db import get_sessionmaker

    key_id, headers = _key("acme")
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with get_sessionmaker()() as session:
        assert revoke_key(session, key_id)
    time.sleep(0.6)
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_submit_and_poll_on_the_asyncpg_path_write_and_read_the_row_and_publish_its_id(
    client: TestClient, quiet_redis_url: str
) -> None:
    from shared.db import get_sessionmaker
    from shared.models import Job

    _, headers = _key("acme")
    submitted = client.post("/v1/generations", json={"prompt": "hello\u2028", "max_tokens": 2}, headers=headers)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    with get_sessionmaker()() as session:
        row = session.get(Job, job_id)
        assert row is not None
        assert (row.tenant, row.status, row.params["prompts"], row.base_model) == (
            "acme",
            "queued",
            ["hello\u2028"],
            BASE,
        )
    message = json.loads(redis.Redis.from_url(quiet_redis_url).rpop("generate") or b"")
    assert json.loads(base64.b64decode(message["body"]))[0] == [job_id]
    polled = client.get(f"/v1/generations/{job_id}", headers=headers)
    assert polled.status_code == 200
    assert {k: v for k, v in polled.json().items() if k != "queue_seconds"} == {
        k: v for k, v in submitted.json().items() if k != "queue_seconds"
    }
    _, other = _key("other")
    assert client.get(f"/v1/generations/{job_id}", headers=other).status_code == 404


def test_quota_on_the_asyncpg_path_refuses_the_submit_past_it(client: TestClient) -> None:
    _, headers = _key("acme")
    answers = [
        client.post("/v1/generations", json={"prompt": "hi", "max_tokens": 1}, headers=headers).status_code
        for _ in range(4)
    ]
    assert answers == [202, 202, 202, 429]


def test_hot_routes_answer_as_fastapi_answers_without_them(client: TestClient) -> None:
    """gateway/hot_routes.py answers submits and polls itself: every answer, refusals included, is the one the
    same app without it gives (FastAPI's routes)."""
    from gateway.app import create_app
    from gateway.hot_routes import HotRoutes
    from gateway.request_metrics import _CHILDREN

    plain_app = create_app()
    plain_app.user_middleware = [m for m in plain_app.user_middleware if m.cls is not HotRoutes]
    _, headers = _key("acme")
    json_headers = headers | {"content-type": "application/json"}
    requests: list[tuple[str, str, dict[str, object]]] = [
        ("POST", "/v1/generations", {"json": {"prompt": "hi", "max_tokens": 1}}),
        ("POST", "/v1/generations", {"json": {"prompt": ""}}),
        ("POST", "/v1/generations", {"json": {"prompt": "hi", "max_tokens": 10**6}}),
        ("POST", "/v1/generations", {"json": {"prompt": "a", "prompts": ["b"]}}),
        ("POST", "/v1/generations", {"json": {"prompt": "hi", "model": "no-such-model"}}),
        ("POST", "/v1/generations", {"json": {"prompt": "nul \u0000"}}),
        ("POST", "/v1/generations", {"content": b"not json", "headers": json_headers}),
        (
            "POST",
            "/v1/generations",
            {"content": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": json_headers},
        ),
        (
            "POST",
            "/v1/generations",
            {"content": b'{"prompt": "hi"}', "headers": headers | {"content-type": "text/plain"}},
        ),
        ("GET", "/v1/generations/gen-nosuchjob", {}),
        ("GET", "/v1/generations/gen-bad%01id", {}),
    ]
    with TestClient(plain_app) as plain:
        for method, path, extra in requests:
            kwargs = {"headers": headers, **extra}
            ours, theirs = client.request(method, path, **kwargs), plain.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert (ours.status_code, ours.headers["content-type"]) == (
                theirs.status_code,
                theirs.headers["content-type"],
            )
            if ours.status_code == 202:
                job_id = ours.json()["id"]
                polled, polled_plain = (
                    client.get(f"/v1/generations/{job_id}", headers=headers),
                    plain.get(f"/v1/generations/{job_id}", headers=headers),
                )
                assert polled.status_code == 200 and polled.json() == polled_plain.json()
                assert ours.json().keys() == theirs.json().keys()
            else:
                assert ours.json() == theirs.json(), (method, path, extra)
    assert ("GET", "/v1/generations/{job_id}", 200) in _CHILDREN  # metrics name the route's template


def test_grouped_inserts_hold_the_quota_within_a_group_and_fail_only_the_job_postgres_refuses(
    postgres_url: str,
) -> None:
    import asyncpg
    from sqlalchemy.orm import Session

    from gateway import pg
    from shared.db import make_engine
    from shared.models import Job, new_id, utcnow

    def job(tenant: str, prompt: str, model: str = BASE) -> pg.JobRow:
        now = utcnow()
        return pg.JobRow(id=new_id("gen-"), tenant=tenant, kind="generate", status="queued", model=model,
                         base_model=BASE, params={"prompts": [prompt]}, result=None, error=None, attempt=0,
                         max_attempts=3, worker=None, lease_expires_at=None, cancel_requested=False,
                         published_at=now, created_at=now, started_at=None, finished_at=None,
                         updated_at=now)  # fmt: skip

    async def submit_together(jobs: list[pg.JobRow]) -> list[object]:
        pool = await pg.open_pool(postgres_url)
        assert pool is not None
        inserts = pg.GroupedInserts(pool)
        try:
            return list(await asyncio.gather(*(inserts.insert(j, 3) for j in jobs), return_exceptions=True))
        finally:
            await pool.close()

    answers = asyncio.run(submit_together([job("grouped-a", f"a{i}") for i in range(10)]))  # one group
    assert answers == [None] * 3 + [3] * 7  # the first three in, the rest refused at 3
    answers = asyncio.run(submit_together([job("grouped-b", "b", model="nul \u0000"), job("grouped-b", "b")]))
    assert isinstance(answers[0], asyncpg.DataError)  # Postgres refuses a NUL in a text column
    assert answers[1] is None
    with Session(make_engine(postgres_url)) as session:
        tenants = [row.tenant for row in session.query(Job).filter(Job.tenant.in_(["grouped-a", "grouped-b"]))]
    assert sorted(tenants) == ["grouped-a"] * 3 + ["grouped-b"]
