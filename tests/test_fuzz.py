"""Schemathesis fuzzes every operation of the gateway's OpenAPI schema against a real gateway process
(Postgres, a Redis database no worker consumes): no answer is a 5xx, and every answer is documented
(status code, content type and body schema).

No worker runs, so jobs stay queued: POST /v1/completions and ?wait= give up after a fraction of a
second (LLMQ_COMPLETION_TIMEOUT_SECONDS, LLMQ_MAX_WAIT_SECONDS). A completion that times out answers
its documented 504, the one server-side status allowed here.

Runs twice: with API keys off (the default tenant) and with LLMQ_REQUIRE_API_KEYS=true and a valid key.
LLMQ_FUZZ_EXAMPLES sets the examples per operation (default 25: about a minute on two cores).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.process_settings import configure
from tests.systems import System, start_system

EXAMPLES = int(os.environ.get("LLMQ_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def _gateway(env: dict[str, str], data: Path) -> Iterator[System]:
    env = {
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": "test-base-model",
        "LLMQ_COMPLETION_TIMEOUT_SECONDS": "0.3",
        "LLMQ_MAX_WAIT_SECONDS": "0.3",
        "LLMQ_RATE_LIMIT_PER_MINUTE": "0",
        **env,
    }
    system = start_system(env, data / "logs", queues=())
    try:
        yield system
    finally:
        system.children.stop_all()
        log = data / "logs" / "gateway.log"
        if log.exists() and "Traceback" in (text := log.read_text(errors="replace")):
            print(text[-20_000:])  # shown when the test fails


@pytest.fixture(scope="module")
def open_gateway(postgres_url: str, quiet_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    env = {"LLMQ_DATABASE_URL": postgres_url, "LLMQ_BROKER_URL": quiet_redis_url}
    yield from _gateway(env, tmp_path_factory.mktemp("fuzz-open"))


@pytest.fixture(scope="module")
def keyed_gateway(
    postgres_url: str, quiet_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    env = {"LLMQ_DATABASE_URL": postgres_url, "LLMQ_BROKER_URL": quiet_redis_url, "LLMQ_REQUIRE_API_KEYS": "true"}
    yield from _gateway(env, tmp_path_factory.mktemp("fuzz-keyed"))


@pytest.fixture(scope="module")
def api_key(postgres_url: str) -> str:
    from sqlalchemy.orm import Session

    from shared.api_keys import create_key
    from shared.db import make_engine

    engine = make_engine(postgres_url)
    try:
        with Session(engine) as session:
            return create_key(session, "fuzz-tenant", "fuzz").token
    finally:
        engine.dispose()


def _openapi() -> dict[str, object]:
    """The schema the gateway serves at /openapi.json (built here: collection happens before any server runs)."""
    from gateway.app import create_app
    from tests.process_settings import reset_caches

    try:
        return create_app().openapi()
    finally:
        reset_caches()


schema = schemathesis.openapi.from_dict(_openapi())


def _call_and_validate(case: Case, system: System, headers: dict[str, str] | None = None) -> None:
    response = case.call(base_url=system.base_url, headers=headers, timeout=30)
    checks = CHECKS
    if case.operation.path == "/v1/completions" and response.status_code == 504:
        checks = [check for check in CHECKS if check is not not_a_server_error]  # its documented timeout
    case.validate_response(response, checks=checks, headers=headers, transport_kwargs={"base_url": system.base_url})


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_api_keys(case: Case, open_gateway: System) -> None:
    _call_and_validate(case, open_gateway)


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_an_api_key(case: Case, keyed_gateway: System, api_key: str) -> None:
    _call_and_validate(case, keyed_gateway, {"Authorization": f"Bearer {api_key}"})


# --- Inputs the fuzzer does not generate (it sends valid JSON and printable text), each once a 500 ---

JSON = {"content-type": "application/json"}
DEEP = 700  # json.loads reads it; echoing it back as a validation error's input used to overflow the stack


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/generations", '{"prompt": "a", "temperature": NaN}', 422),
        ("POST", "/v1/generations", '{"prompt": "a", "seed": 1e400}', 422),
        ("POST", "/v1/generations", '{"prompt": "a", "stop": [Infinity]}', 422),
        ("POST", "/v1/completions", '{"model": "m", "prompt": "a", "logit_bias": {"1": -Infinity}}', 400),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            '{"model": "test-base-model", "method": {"supervised": '
            '{"hyperparameters": {"learning_rate_multiplier": NaN}}}}',
            400,
        ),
        ("POST", "/v1/generations", '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}", 422),
        (
            "POST",
            "/v1/completions",
            '{"model": "m", "prompt": "a", "x": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
            400,
        ),
        ("POST", "/v1/generations", "[" * 5000, 400),
        ("POST", "/v1/generations", b'{"prompt": "\xff\xfe"}', 400),
        ("POST", "/v1/generations", '{"prompt": "a", "model": "m\\u0000"}', 422),
        ("GET", "/v1/generations/gen-%00", None, 422),
        ("GET", "/v1/jobs?after=%00", None, 422),
        ("GET", "/v1/fine_tuning/jobs?after=a%00b", None, 400),  # OpenAI's routes answer 400 (docs/API.md)
        ("GET", "/v1/models/m%00", None, 400),
        ("POST", "/v1/fine_tuning/jobs", '{"model": "test-base-model", "training_file": "file-\\u0000"}', 400),
        ("POST", "/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": NaN}]}', 400),
    ],
)
def test_hostile_input_answers_a_documented_4xx(
    open_gateway: System, method: str, path: str, body: str | bytes | None, status: int
) -> None:
    from shared.schemas import ValidationErrorResponse

    response = httpx.request(method, open_gateway.base_url + path, content=body, headers=JSON, timeout=30)
    assert response.status_code == status, response.text
    ValidationErrorResponse.model_validate(response.json())  # detail: the issues (a list) or a text


def test_a_completion_no_worker_serves_answers_the_documented_504(open_gateway: System) -> None:
    from shared.schemas import ErrorResponse

    body = {"model": "test-base-model", "prompt": "Hi", "max_tokens": 2}
    response = httpx.post(f"{open_gateway.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    ErrorResponse.model_validate(response.json())
    # Streamed, the answer is already 200: the stream ends with an error event instead.
    response = httpx.post(f"{open_gateway.base_url}/v1/completions", json=body | {"stream": True}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert '"code": "timeout"' in response.text


@pytest.mark.parametrize("nested", [b"[" * 100_000, b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"])
def test_a_training_file_nested_too_deeply_is_invalid(open_gateway: System, nested: bytes) -> None:
    response = httpx.post(f"{open_gateway.base_url}/v1/files", files={"file": ("deep.jsonl", nested)}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_file" and "nested too deeply" in response.json()["detail"]


@pytest.mark.parametrize("header", [None, "Bearer nope", "Bearer llmq-0000-secret", "Basic abc"])
def test_requests_without_a_valid_key_answer_a_documented_401(keyed_gateway: System, header: str | None) -> None:
    from shared.schemas import ErrorResponse

    headers = {"Authorization": header} if header else {}
    response = httpx.get(f"{keyed_gateway.base_url}/v1/jobs", headers=headers, timeout=30)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    ErrorResponse.model_validate(response.json())


def test_a_streamed_completion_over_the_quota_answers_429_not_an_empty_stream(
    postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    configure(
        monkeypatch,
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model="test-base-model",
        data_dir=str(tmp_path),
        require_api_keys="true",
        max_active_jobs_per_tenant="1",
        completion_timeout_seconds="0.2",
    )
    from gateway.app import create_app
    from shared.api_keys import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        key = create_key(session, "quota-tenant").token  # a tenant of its own: no other test's jobs count
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "test-base-model", "prompt": "Hi", "stream": True}
    with TestClient(create_app()) as client:
        assert client.post("/v1/generations", json={"prompt": "Hi"}, headers=headers).status_code == 202
        response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
