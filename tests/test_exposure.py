"""What the gateway shows to whom: /metrics closed when tenants are kept apart and no metrics token is set,
failed authentications throttled per client address, an OpenAPI schema that states the real limits, and
OPTIONS and 405 answers that list every method of a path. In process, on real Postgres and Redis."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.process_settings import configure

BASE = "test-base-model"


@pytest.fixture
def env(postgres_url: str, quiet_redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"database_url": postgres_url, "broker_url": quiet_redis_url, "base_model": BASE,
            "data_dir": str(tmp_path), "require_api_keys": "true"}  # fmt: skip


def client_for(monkeypatch: pytest.MonkeyPatch, address: str = "testclient", **env: str) -> TestClient:
    configure(monkeypatch, **env)
    from gateway.app import create_app

    return TestClient(create_app(), client=(address, 50000))


def new_key(tenant: str) -> dict[str, str]:
    from shared.api_keys import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        return {"Authorization": f"Bearer {create_key(session, tenant, 'test').token}"}


def test_metrics_are_closed_while_keys_are_required_and_no_metrics_token_is_set(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_for(monkeypatch, **env) as client:
        tenant_key = new_key("alice")
        for headers in ({}, tenant_key):  # a tenant's API key does not open it either
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 401 and "LLMQ_METRICS_TOKEN" in answer.json()["detail"]
    with client_for(monkeypatch, **env, metrics_token="scrape-me") as client:
        assert client.get("/metrics", headers=tenant_key).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
    monkeypatch.delenv("LLMQ_METRICS_TOKEN")
    with client_for(monkeypatch, **env | {"require_api_keys": "false"}) as client:
        assert client.get("/metrics").status_code == 200  # one tenant, bound to localhost: open as before


@pytest.mark.parametrize("store", ["redis", "in-process"])
def test_failed_authentications_are_throttled_per_client_address(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, store: str, tmp_path: Path
) -> None:
    if store == "in-process":
        from shared.migrate import upgrade

        env = env | {"database_url": f"sqlite:///{tmp_path / 'llmq.db'}", "broker_url": ""}
        upgrade(env["database_url"])
    if time.time() % 60 > 50:  # the count is per clock minute: do not straddle two
        time.sleep(61 - time.time() % 60)
    address = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
    with client_for(monkeypatch, address, **env, auth_failures_per_minute="3") as client:
        good = new_key("alice")
        assert client.get("/v1/jobs", headers=good).status_code == 200
        wrong = {"Authorization": "Bearer llmq-0000-guess"}
        assert [client.get("/v1/jobs", headers=wrong).status_code for _ in range(3)] == [401] * 3
        throttled = client.get("/v1/jobs", headers=wrong)
        assert throttled.status_code == 429 and 1 <= int(throttled.headers["retry-after"]) <= 61
        assert throttled.json()["error"]["code"] == "rate_limit_exceeded"
        # Past the limit, not even a valid key is checked from that address: guessing gains nothing.
        assert client.get("/v1/jobs", headers=good).status_code == 429
        assert client.post("/v1/generations", json={"prompt": "hi"}, headers=good).status_code == 429
    with client_for(monkeypatch, "10.255.255.254", **env, auth_failures_per_minute="3") as client:
        assert client.get("/v1/jobs", headers=good).status_code == 200  # another address is not held


def _documented_methods(schema: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m.upper() for m in operations} for path, operations in schema["paths"].items()}


def test_options_and_405_list_every_method_of_the_path(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with client_for(monkeypatch, **env) as client:
        documented = _documented_methods(client.get("/openapi.json").json())
        assert documented["/v1/files"] == {"GET", "POST"}  # two routes share the path
        for template, methods in documented.items():
            path = re.sub(r"\{[^}]+\}", "x", template)
            expected = ", ".join(sorted(methods | {"OPTIONS"}))
            options = client.options(path)  # no key: the methods are public, as in /openapi.json
            assert options.status_code == 204 and options.headers["allow"] == expected, path
            other = next(m for m in ("PATCH", "PUT", "DELETE", "POST") if m not in methods)
            wrong = client.request(other, path, headers=new_key("alice"))
            assert wrong.status_code == 405, (other, path)
            assert wrong.headers["allow"] == expected, path
            assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert client.options("/no/such/path").status_code == 404


def _fields(schema: dict[str, Any], node: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every leaf (number, string, array, object) reachable in a request schema, with a dotted name."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        yield from _fields(schema, schema["components"]["schemas"][name], name)
        return
    if "enum" in node or "const" in node:
        yield where, node
        return
    for variant in node.get("anyOf", []):
        yield from _fields(schema, variant, where)
    for field, sub in node.get("properties", {}).items():
        yield from _fields(schema, sub, f"{where}.{field}")
    if node.get("type") == "array":
        yield where, node
        yield from _fields(schema, node.get("items", {}), f"{where}[]")
    elif node.get("type") == "object" and "properties" not in node:
        yield where, node
        yield from _fields(schema, node.get("additionalProperties") or {}, f"{where}{{}}")
    elif node.get("type") in ("integer", "number", "string"):
        yield where, node


# The upload's size is stated in its description (a binary part has no maxLength); logit_bias must be empty.
# An entry that becomes bounded fails the test until it is removed from here.
UNBOUNDED = {
    "Body_upload_file_v1_files_post.file", "CompletionRequest.logit_bias{}", "ChatCompletionRequest.logit_bias{}",
}  # fmt: skip
UNBOUNDED_QUERY = {"after", "wait"}  # ids; ?wait= longer than LLMQ_MAX_WAIT_SECONDS is cut short, not refused


def _bounded(node: dict[str, Any]) -> bool:
    if "enum" in node or "const" in node or node.get("format") == "binary":
        return True
    kind = node.get("type")
    if kind in ("integer", "number"):
        return ("minimum" in node or "exclusiveMinimum" in node) and ("maximum" in node or "exclusiveMaximum" in node)
    if kind == "string":
        return "maxLength" in node or "pattern" in node
    if kind == "array":
        return "maxItems" in node
    return "maxProperties" in node


def test_openapi_schema_bounds_every_request_field_and_query_parameter(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_for(monkeypatch, **env) as client:
        schema = client.get("/openapi.json").json()
    loose, seen_unbounded = [], set()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and parameter["name"] not in UNBOUNDED_QUERY:
                    for _, node in _fields(schema, parameter["schema"], parameter["name"]):
                        if not _bounded(node):
                            loose.append(f"{method.upper()} {path} ?{parameter['name']}: {node}")
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for name, node in _fields(schema, content["schema"], "body"):
                    if not _bounded(node):
                        if name in UNBOUNDED:
                            seen_unbounded.add(name)
                        else:
                            loose.append(f"{method.upper()} {path} {name}: {node}")
    assert loose == [], "\n".join(loose)
    stale = sorted(UNBOUNDED - seen_unbounded)
    assert stale == [], f"bounded now: remove from UNBOUNDED: {stale}"


def test_openapi_schema_states_the_caps_this_gateway_is_configured_with(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    caps = {"max_new_tokens": "77", "max_n": "3", "max_prompt_chars": "999", "max_prompts_per_job": "11"}
    with client_for(monkeypatch, **env, **caps) as client:
        models = client.get("/openapi.json").json()["components"]["schemas"]
        for name in ("GenerationRequest", "CompletionRequest"):
            fields = models[name]["properties"]
            assert fields["max_tokens"]["maximum"] == 77 and fields["n"]["maximum"] == 3
            texts = [v for f in ("prompt", "prompts") for v in fields.get(f, {}).get("anyOf", [])]
            assert {"minLength": 1, "maxLength": 999}.items() <= next(v for v in texts if v["type"] == "string").items()
            listed = next(v for v in texts if v["type"] == "array")
            assert listed["maxItems"] == 11 and listed["items"]["maxLength"] == 999
        # and the gateway refuses what the schema says it refuses
        key = new_key("alice")
        over = client.post("/v1/generations", json={"prompt": "hi", "max_tokens": 78}, headers=key)
        assert over.status_code == 422 and over.json()["error"]["param"] == "body.max_tokens"
