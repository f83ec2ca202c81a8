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


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_with_an_empty_prompt_list_answers_400_naming_prompt(client: TestClient, stream: bool) -> None:
    response = client.post("/v1/completions", json={"model": BASE, "prompt": [], "stream": stream})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    assert client.get("/v1/jobs").json()["data"] == []  # no job that would never end


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/generations"])
@pytest.mark.parametrize("raw", [b'{"model":', b'{"prompt": "Hi"} and more', b"\xff{}"])
def test_a_body_that_is_not_json_answers_400_invalid_request_naming_no_parameter(
    client: TestClient, path: str, raw: bytes
) -> None:
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error.get("param") is None, error
    assert "JSON" in error["message"] and "[" not in error["message"], error  # no character offset as a field


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/generations"])
@pytest.mark.parametrize(
    ("content", "content_type", "said"),
    [
        (b'{"model": "m", "prompt": "Hi"}', "text/plain", ["Content-Type: application/json", "text/plain"]),
        (b'["Hi"]', "application/json", ["must be a JSON object"]),
    ],
)
def test_a_body_that_is_not_a_json_object_is_told_what_to_send(
    client: TestClient, path: str, content: bytes, content_type: str, said: list[str]
) -> None:
    response = client.post(path, content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error.get("param") is None, error
    assert all(words in error["message"] for words in said), error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/generations"])
def test_a_compressed_body_is_told_that_content_encoding_is_not_supported(client: TestClient, path: str) -> None:
    import gzip

    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = client.post(path, content=gzip.compress(b'{"model": "m", "prompt": "Hi"}'), headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "Content-Encoding 'gzip' is not supported" in error["message"]


@pytest.mark.parametrize(
    ("extra", "param", "limit"),
    [({"user": "u" * 300}, "user", 256), ({"metadata": {"k" * 65: "v"}}, "metadata", 64)],
)
def test_text_over_its_length_limit_is_told_in_characters(
    client: TestClient, extra: dict[str, Any], param: str, limit: int
) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}]} | extra
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and f"at most {limit} characters" in error["message"], error


def test_parameters_sent_as_null_take_their_defaults(client: TestClient) -> None:
    nulls = {"max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None, "seed": None}
    sent = client.post("/v1/generations", json={"prompt": "Hi"} | nulls)
    assert sent.status_code == 202, sent.text
    plain = client.post("/v1/generations", json={"prompt": "Hi"})
    stored = [client.get(f"/v1/generations/{r.json()['id']}").json()["request"] for r in (sent, plain)]
    assert stored[0] == stored[1]
    required = client.post("/v1/completions", json={"model": None, "prompt": "Hi"})  # a required one stays required
    assert required.status_code == 400 and required.json()["error"]["param"] == "model", required.text


@pytest.mark.parametrize(
    ("schema", "required"),
    [
        ("shared.schemas:CompletionRequest", {"model": "m", "prompt": "Hi"}),
        ("shared.chat_schemas:ChatCompletionRequest", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
        ("shared.schemas:GenerationRequest", {"prompt": "Hi"}),
        ("shared.schemas:FineTuningJobRequest", {"model": "m", "training_file": "file-1"}),
        ("shared.batch_schemas:BatchRequest", {"input_file_id": "file-1", "endpoint": "/v1/completions"}),
    ],
)
def test_every_request_field_with_a_default_takes_it_when_sent_as_null(schema: str, required: dict[str, Any]) -> None:
    import importlib

    module, name = schema.split(":")
    model = getattr(importlib.import_module(module), name)
    defaulted = [field for field, info in model.model_fields.items() if not info.is_required()]
    nulls = {field: None for field in defaulted if field not in required}
    assert model.model_validate(required | nulls) == model.model_validate(required)


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
