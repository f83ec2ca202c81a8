"""The gateway's REST contract, in process, against real Postgres and Redis (no worker runs here)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete

from tests.process_settings import configure

BASE = "test-base-model"


@pytest.fixture
def client(postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    configure(monkeypatch, database_url=postgres_url, broker_url=quiet_redis_url, base_model=BASE, max_new_tokens="64")
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import Job

    with get_sessionmaker()() as session:
        session.execute(delete(Job))
        session.commit()
    with TestClient(create_app()) as test_client:
        yield test_client


def error_locs(response: object) -> list[list[object]]:
    return [e["loc"] for e in response.json()["detail"]]  # type: ignore[attr-defined]


def test_post_generation_answers_202_with_a_queued_job(client: TestClient) -> None:
    response = client.post("/v1/generations", json={"prompt": "Hi", "max_tokens": 4})
    assert response.status_code == 202
    job = response.json()
    assert job["id"].startswith("gen-") and job["status"] == "queued" and job["created_at"]
    assert job["model"] == BASE
    assert job["request"]["prompts"] == ["Hi"]
    fetched = client.get(f"/v1/generations/{job['id']}").json()
    assert fetched["status"] == "queued" and fetched["outputs"] is None


def test_post_generation_publishes_only_the_job_id(client: TestClient, quiet_redis_url: str) -> None:
    import json

    import redis

    r = redis.Redis.from_url(quiet_redis_url)
    r.delete("generate")
    job = client.post("/v1/generations", json={"prompt": "Hi"}).json()
    (raw,) = r.lrange("generate", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "llmq.generate"
    assert message["content-type"] == "application/json"
    args, kwargs, _ = json.loads(__import__("base64").b64decode(message["body"]))
    assert args == [job["id"]] and kwargs == {}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, ["body", "max_tokens"]),
        ({"prompt": "Hi", "max_tokens": 65}, ["body", "max_tokens"]),
        ({"prompt": "Hi", "temperature": 3}, ["body", "temperature"]),
        ({"prompt": "Hi", "top_p": 0}, ["body", "top_p"]),
        ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, ["body", "stop"]),
        ({"prompts": []}, ["body", "prompts"]),
        ({"prompts": ["ok", ""]}, ["body", "prompts", 1]),
        ({"prompt": "Hi", "colour": "red"}, ["body", "colour"]),
        ({"prompt": 5}, ["body", "prompt"]),
    ],
)
def test_invalid_generation_request_answers_422_naming_the_field(
    client: TestClient, body: dict[str, object], loc: list[object]
) -> None:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422
    assert loc in error_locs(response)


def test_prompt_and_prompts_together_answer_422(client: TestClient) -> None:
    response = client.post("/v1/generations", json={"prompt": "a", "prompts": ["b"]})
    assert response.status_code == 422
    assert "exactly one of prompt or prompts" in response.text


def test_unknown_model_answers_404(client: TestClient) -> None:
    response = client.post("/v1/generations", json={"prompt": "Hi", "model": "nope"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_unknown_job_ids_answer_404(client: TestClient) -> None:
    assert client.get("/v1/generations/gen-nope").status_code == 404
    assert client.get("/v1/generations/gen-nope?wait=1").status_code == 404
    assert client.get("/v1/jobs/gen-nope").json()["detail"] == "job 'gen-nope' not found"


def test_rejected_request_stores_nothing(client: TestClient) -> None:
    client.post("/v1/generations", json={"prompt": "Hi", "max_tokens": 10_000})
    assert client.get("/v1/jobs").json()["data"] == []


def test_jobs_list_newest_first_paginated_and_filtered(client: TestClient) -> None:
    ids = [client.post("/v1/generations", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    client.post(f"/v1/generations/{ids[0]}/cancel")
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get("/v1/jobs", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [j["id"] for j in second["data"]] == ids[::-1][2:4]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", params={"kind": "train"}).json()["data"] == []
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_wait_on_a_finished_job_returns_at_once(client: TestClient) -> None:
    job = client.post("/v1/generations", json={"prompt": "Hi"}).json()
    client.post(f"/v1/generations/{job['id']}/cancel")
    got = client.get(f"/v1/generations/{job['id']}", params={"wait": 30}).json()
    assert got["status"] == "cancelled"


def test_wait_on_an_unfinished_job_gives_up_after_the_wait(client: TestClient) -> None:
    import time

    job = client.post("/v1/generations", json={"prompt": "Hi"}).json()
    started = time.monotonic()
    got = client.get(f"/v1/generations/{job['id']}", params={"wait": 0.5}).json()
    assert got["status"] == "queued"
    assert 0.4 < time.monotonic() - started < 5


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "workers": ready.json()["checks"]["workers"]}


def test_readiness_is_degraded_naming_each_kind_without_a_live_worker(client: TestClient) -> None:
    from shared import workers
    from shared.db import get_sessionmaker
    from shared.models import Worker

    def beat(worker_id: str, kind: str) -> None:
        with get_sessionmaker()() as session:
            workers.heartbeat(session, workers.Beat(worker_id, kind, "host", 1, "m", ["gen-1"]))

    def ready() -> Any:
        # Only this test's rows: a real worker of another test on this database is left out (it beats every 5 s).
        with get_sessionmaker()() as session:
            session.query(Worker).filter(Worker.host != "host").delete()
            session.commit()
        return client.get("/readyz")

    with get_sessionmaker()() as session:
        session.query(Worker).delete()
        session.commit()
    none = ready()
    assert none.status_code == 200  # the gateway still takes jobs; they wait
    assert none.json()["status"] == "degraded"
    assert none.json()["checks"]["workers"] == "degraded: no live generate or train worker"
    beat("host:1", "generate")
    one = ready().json()
    assert one["status"] == "degraded" and one["checks"]["workers"] == "degraded: no live train worker"
    beat("host:2", "train")
    assert ready().json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "workers": "ok"}}
    listed = [w for w in client.get("/v1/workers").json()["data"] if w["host"] == "host"]
    assert [(w["id"], w["kind"], w["live"], w["current_jobs"]) for w in listed] == [
        ("host:1", "generate", True, ["gen-1"]), ("host:2", "train", True, ["gen-1"])
    ]  # fmt: skip
    with get_sessionmaker()() as session:  # a worker that stopped beating goes stale
        workers.deregister(session, "host:2")
    assert ready().json()["status"] == "degraded"


def test_readiness_names_the_broker_when_it_is_unreachable(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, database_url=postgres_url, broker_url="redis://127.0.0.1:1/0")
    from gateway.app import create_app

    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "ok"
    assert ready.json()["checks"]["broker"].startswith("unreachable")


def test_readiness_names_the_database_when_it_is_unreachable(
    quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none", broker_url=quiet_redis_url)
    from gateway.app import create_app

    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
        listing = client.get("/v1/jobs")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("unreachable")
    assert listing.status_code == 503 and listing.json()["detail"] == "database unavailable"


def test_gateway_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import gateway.app, sys; gateway.app.create_app(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
