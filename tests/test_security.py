"""API keys, tenant isolation and limits on hostile input, in process against real Postgres and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from tests.process_settings import configure

BASE = "test-base-model"
SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"


@pytest.fixture
def settings_env(postgres_url: str, quiet_redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "database_url": postgres_url,
        "broker_url": quiet_redis_url,
        "base_model": BASE,
        "data_dir": str(tmp_path),
        "require_api_keys": "true",
        "max_request_bytes": "20000",
    }


def make_client(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    configure(monkeypatch, **env)
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import ApiKey, File, Job

    with get_sessionmaker()() as session:
        for table in (Job, File, ApiKey):
            session.execute(delete(table))
        session.commit()
    return TestClient(create_app())


@pytest.fixture
def client(settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with make_client(monkeypatch, **settings_env) as test_client:
        yield test_client


def new_key(tenant: str) -> dict[str, str]:
    from shared.api_keys import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        return {"Authorization": f"Bearer {create_key(session, tenant, 'test').token}"}


def test_requests_without_a_valid_key_get_identical_401s(client: TestClient) -> None:
    from shared.api_keys import revoke_key
    from shared.db import get_sessionmaker

    good = new_key("acme")
    token = good["Authorization"].removeprefix("Bearer ")
    _, key_id, secret = token.split("-", 2)
    revoked = new_key("acme")
    with get_sessionmaker()() as session:
        revoke_key(session, revoked["Authorization"].split("-")[1])
    wrong = [
        {},
        {"Authorization": token},
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer llmq-{key_id}-{secret[:-1]}x"},
        {"Authorization": f"Bearer llmq-0000000000000000-{secret}"},
        revoked,
    ]
    answers = [client.get("/v1/jobs", headers=h) for h in wrong]
    assert {r.status_code for r in answers} == {401}
    assert len({r.content for r in answers}) == 1
    assert answers[0].headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers=good).status_code == 200
    assert client.get("/healthz").status_code == 200  # health needs no key


def test_keys_are_stored_only_as_hashes(client: TestClient) -> None:
    from shared.db import get_sessionmaker
    from shared.models import ApiKey

    token = new_key("acme")["Authorization"].removeprefix("Bearer ")
    secret = token.split("-", 2)[2]
    with get_sessionmaker()() as session:
        (row,) = session.scalars(select(ApiKey)).all()
    assert secret not in repr(vars(row)) and len(row.secret_sha256) == 64


def test_another_tenants_ids_answer_404_and_lists_show_only_your_own(client: TestClient) -> None:
    alice, bob = new_key("alice"), new_key("bob")
    gen = client.post("/v1/generations", json={"prompt": "hi"}, headers=alice).json()["id"]
    file_id = client.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", SAMPLE.read_bytes())}, headers=alice
    ).json()["id"]
    ft = client.post("/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=alice).json()
    ft_path = f"/v1/fine_tuning/jobs/{ft['id']}"
    paths = [f"/v1/generations/{gen}", f"/v1/jobs/{gen}", f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"]
    paths.append(ft_path)
    for path in [*paths, f"{ft_path}/events", f"{ft_path}/checkpoints"]:
        assert client.get(path, headers=alice).status_code == 200, path
        assert client.get(path, headers=bob).status_code == 404, path
    assert client.post(f"/v1/generations/{gen}/cancel", headers=bob).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{ft['id']}/cancel", headers=bob).status_code == 404
    assert client.delete(f"/v1/files/{file_id}", headers=bob).status_code == 404
    borrowed = client.post("/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=bob)
    assert borrowed.status_code == 400
    assert client.get("/v1/jobs", headers=bob).json()["data"] == []
    assert client.get("/v1/files", headers=bob).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=bob).json()["data"] == []
    assert len(client.get("/v1/jobs", headers=alice).json()["data"]) == 2


def test_another_tenants_fine_tuned_model_does_not_exist_for_you(client: TestClient) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneParams
    from shared.models import FineTunedModel

    alice, bob = new_key("alice"), new_key("bob")
    with get_sessionmaker()() as session:
        params = FineTuneParams(hyperparameters={})
        job = job_states.create_job(
            session, kind="train", model=BASE, base_model=BASE, params=params, max_attempts=1, tenant="alice"
        )
        session.flush()
        session.add(FineTunedModel(id=f"ft:{BASE}:x:{job.id}", tenant="alice", job_id=job.id, base_model=BASE,
                                   path=f"adapters/{job.id}", manifest={}))  # fmt: skip
        session.commit()
        model_id = f"ft:{BASE}:x:{job.id}"
    assert model_id in [m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]]
    assert model_id not in [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]]
    assert client.post("/v1/generations", json={"prompt": "hi", "model": model_id}, headers=alice).status_code == 202
    assert client.post("/v1/generations", json={"prompt": "hi", "model": model_id}, headers=bob).status_code == 404


def test_another_tenants_checkpoints_and_models_cannot_be_used_continued_paused_or_deleted(
    client: TestClient,
) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneParams
    from shared.models import Checkpoint, FineTunedModel

    alice, bob = new_key("alice"), new_key("bob")
    with get_sessionmaker()() as session:
        params = FineTuneParams(hyperparameters={}, suffix="x")
        job = job_states.create_job(
            session, kind="train", model=BASE, base_model=BASE, params=params, max_attempts=1, tenant="alice"
        )
        session.flush()
        model_id = f"ft:{BASE}:x:{job.id}"
        session.add(FineTunedModel(id=model_id, tenant="alice", job_id=job.id, base_model=BASE,
                                   path=f"adapters/{job.id}", manifest={}))  # fmt: skip
        session.add(Checkpoint(id="ftckpt-1", job_id=job.id, step=3, path=f"jobs/{job.id}/c", metrics={}))
        session.commit()
        job_id = job.id
    checkpoint = f"{model_id}:ckpt-step-3"
    assert client.get(f"/v1/models/{checkpoint}", headers=alice).json()["root"] == BASE
    for model in (model_id, checkpoint):
        assert client.get(f"/v1/models/{model}", headers=bob).status_code == 404
        generation = client.post("/v1/generations", json={"prompt": "hi", "model": model}, headers=bob)
        assert generation.status_code == 404
        continued = client.post("/v1/fine_tuning/jobs", json={"model": model}, headers=bob)
        assert continued.status_code == 404 and continued.json()["error"]["code"] == "model_not_found"
    assert client.delete(f"/v1/models/{model_id}", headers=bob).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=bob).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=bob).status_code == 404
    assert client.get(f"/v1/models/{model_id}", headers=alice).status_code == 200


@pytest.mark.parametrize("field", ["status", "tenant", "attempt", "id", "result"])
def test_clients_cannot_set_server_owned_fields(client: TestClient, field: str) -> None:
    response = client.post("/v1/generations", json={"prompt": "hi", field: "x"}, headers=new_key("a"))
    assert response.status_code == 422
    assert ["body", field] in [e["loc"] for e in response.json()["detail"]]


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc", "ft:../../x", "openai-community/gpt2"])
def test_models_outside_the_catalog_are_refused(client: TestClient, model: str) -> None:
    response = client.post("/v1/generations", json={"prompt": "hi", "model": model}, headers=new_key("a"))
    assert response.status_code == 404
    fine_tune = client.post("/v1/fine_tuning/jobs", json={"model": model}, headers=new_key("a"))
    # An ft: id names a fine-tuned model to continue from: one that is not yours does not exist (404).
    assert fine_tune.status_code == (404 if model.startswith("ft:") else 400)


def test_request_body_over_the_limit_answers_413(client: TestClient) -> None:
    big = {"prompt": "x" * 30_000}
    assert client.post("/v1/generations", json=big, headers=new_key("a")).status_code == 413


def test_chunked_body_over_the_limit_answers_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    headers = new_key("a") | {"content-type": "application/json"}
    response = client.post("/v1/generations", content=chunks(), headers=headers)
    assert response.status_code == 413
    assert "larger than 20000 bytes" in response.json()["detail"]
    assert client.get("/v1/jobs", headers=headers).json()["data"] == []


def test_rate_limit_per_key_answers_429_with_retry_after(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(monkeypatch, **settings_env, rate_limit_per_minute="5") as client:
        key, other = new_key("a"), new_key("b")
        codes = [client.get("/v1/jobs", headers=key).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        limited = client.get("/v1/jobs", headers=key)
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        assert client.get("/v1/jobs", headers=other).status_code == 200  # a limit per key


def test_active_job_quota_answers_429_with_retry_after(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(monkeypatch, **settings_env, max_active_jobs_per_tenant="2") as client:
        key = new_key("a")
        codes = [client.post("/v1/generations", json={"prompt": "hi"}, headers=key).status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        last = client.post("/v1/generations", json={"prompt": "hi"}, headers=key)
        assert last.headers["retry-after"] == "5" and "at most 2" in last.json()["detail"]
        assert client.post("/v1/generations", json={"prompt": "hi"}, headers=new_key("b")).status_code == 202
