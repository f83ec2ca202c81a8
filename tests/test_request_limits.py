"""What a request may name and how big it may be: hub datasets (never a path), strict JSON types, the caps on
stop strings and training sizes, LoRA target modules, oversized integers, and parameters and file names with
control characters. In process against real Postgres and Redis; every refusal is a 4xx naming the field and
leaves no row and no message behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.process_settings import configure

SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"


@pytest.fixture
def client(
    postgres_url: str, quiet_redis_url: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    configure(
        monkeypatch,
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model=str(tiny_model),  # a local directory: the gateway reads its module names from config.json
        allowed_base_models=json.dumps(["some-org/unreadable-model"]),
        data_dir=str(tmp_path / "data"),
        require_api_keys="true",
        rate_limit_per_minute="0",
    )
    from gateway.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def tenant(client: TestClient) -> dict[str, str]:
    """Headers of a fresh tenant's key (no other test's rows count for it)."""
    import secrets

    from shared.api_keys import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        return {"Authorization": f"Bearer {create_key(session, f'limits-{secrets.token_hex(4)}').token}"}


def tenant_of(headers: dict[str, str]) -> str:
    from shared.api_keys import authenticate
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        found = authenticate(session, headers["Authorization"].removeprefix("Bearer "))
        assert found is not None
        return found[0]


def stored(headers: dict[str, str]) -> tuple[int, int]:
    """The tenant's job and file rows."""
    from shared.db import get_sessionmaker
    from shared.models import File, Job

    tenant = tenant_of(headers)
    with get_sessionmaker()() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant))
        files = session.scalar(select(func.count()).select_from(File).where(File.tenant == tenant))
        return jobs or 0, files or 0


def queued_messages(url: str) -> int:
    connection = redis.Redis.from_url(url)
    return int(connection.llen("train")) + int(connection.llen("generate"))


def refused(response: Any, *where: str | int) -> str:
    """The message of a 4xx that names the field at `where` (body.<...>; OpenAI's spelling on OpenAI's routes,
    which answer 400); fails otherwise."""
    from gateway.errors import openai_param, openai_route

    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    if openai_route(response.request.url.path):
        assert response.status_code == 400, response.text
        param = openai_param(where)
    else:
        param = ".".join(str(part) for part in where)
    assert error["param"] == param, error
    return str(error["message"])


def fine_tune(client: TestClient, headers: dict[str, str], tiny_model: Path, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model), **body}, headers=headers)


HP = ("method", "supervised", "hyperparameters")


def hyper(**values: Any) -> dict[str, Any]:
    return {"method": {"type": "supervised", "supervised": {"hyperparameters": values}}}


# --- dataset.name: an offered hub id, never a path ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "/etc",
        "{store}/files",  # the artifact store's uploads: every tenant's training files
        "{store}/../data",
        "../../srv/llmq/artifacts/files",
        "tatsu-lab/../../etc",
        "~/datasets",
        "~root/alpaca",
        "C:\\datasets\\alpaca",
        "owner\\name",
        "file:///etc/passwd",
        "hf://datasets/tatsu-lab/alpaca",
        "s3://bucket/alpaca",
        "./tatsu-lab/alpaca",
        "tests/chaos",  # an existing folder in owner/name form that is not offered
        "tatsu-lab/alpaca/../../../etc",
        "tatsu-lab/alpaca\x00",
    ],
)
def test_a_dataset_name_that_is_a_path_is_refused_and_nothing_is_queued(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, quiet_redis_url: str, name: str
) -> None:
    from shared.artifacts import ArtifactStore
    from shared.settings import get_settings

    name = name.format(store=ArtifactStore.from_settings(get_settings()).root)  # the file:// store's folder
    messages = queued_messages(quiet_redis_url)
    response = fine_tune(client, tenant, tiny_model, dataset={"name": name})
    refused(response, "body", "dataset", "name")
    assert stored(tenant) == (0, 0) and queued_messages(quiet_redis_url) == messages


def test_an_offered_dataset_name_that_is_also_a_local_folder_is_refused(
    client: TestClient,
    tenant: dict[str, str],
    tiny_model: Path,
    quiet_redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "acme" / "alpaca").mkdir(parents=True)
    (tmp_path / "acme" / "alpaca" / "train.jsonl").write_bytes(SAMPLE.read_bytes())
    configure(monkeypatch, allowed_datasets=json.dumps(["acme/alpaca"]))
    monkeypatch.chdir(tmp_path)  # where datasets.load_dataset would find the folder before the hub
    messages = queued_messages(quiet_redis_url)
    message = refused(fine_tune(client, tenant, tiny_model, dataset={"name": "acme/alpaca"}), "body", "dataset", "name")
    assert "path on this machine" in message
    assert stored(tenant) == (0, 0) and queued_messages(quiet_redis_url) == messages


def test_a_dataset_outside_the_allowlist_is_refused_naming_what_is_offered(
    client: TestClient, tenant: dict[str, str], tiny_model: Path
) -> None:
    message = refused(
        fine_tune(client, tenant, tiny_model, dataset={"name": "someone/secret-set"}), "body", "dataset", "name"
    )
    assert "not offered" in message and "tatsu-lab/alpaca" in message and "yahma/alpaca-cleaned" in message
    assert stored(tenant) == (0, 0)


@pytest.mark.parametrize("name", ["tatsu-lab/alpaca", "yahma/alpaca-cleaned", "vicgalle/alpaca-gpt4"])
def test_the_alpaca_family_is_offered_by_default(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, name: str
) -> None:
    response = fine_tune(client, tenant, tiny_model, dataset={"name": name, "sample_size": 100})
    assert response.status_code == 200, response.text
    assert response.json()["dataset"] == {"name": name, "split": "train", "sample_size": 100}


@pytest.mark.parametrize("split", ["../train", "train/../x", "train[:10%]", "C:\\x", ""])
def test_a_split_that_is_not_a_plain_name_is_refused(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, split: str
) -> None:
    refused(fine_tune(client, tenant, tiny_model, dataset={"name": "tatsu-lab/alpaca", "split": split}),
            "body", "dataset", "split")  # fmt: skip
    assert stored(tenant) == (0, 0)


def test_a_path_in_the_dataset_allowlist_stops_the_service_from_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from shared.settings import Settings

    monkeypatch.setenv("LLMQ_ALLOWED_DATASETS", json.dumps(["tatsu-lab/alpaca", "/srv/data"]))
    with pytest.raises(ValidationError, match="is a path or URL"):
        Settings()


# --- Strict types: no string becomes a number, no number a boolean ------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/v1/generations", {"prompt": "hi", "max_tokens": "10"}, ("max_tokens",)),
        ("/v1/generations", {"prompt": "hi", "n": True}, ("n",)),
        ("/v1/generations", {"prompt": "hi", "temperature": "0.5"}, ("temperature",)),
        ("/v1/generations", {"prompt": "hi", "seed": 1.0}, ("seed",)),
        ("/v1/generations", {"prompt": 5}, ("prompt",)),
        ("/v1/completions", {"model": "{base}", "prompt": "hi", "echo": 1}, ("echo",)),
        ("/v1/completions", {"model": "{base}", "prompt": "hi", "stream": "false"}, ("stream",)),
        ("/v1/completions", {"model": "{base}", "prompt": "hi", "max_tokens": 2.0}, ("max_tokens",)),
        ("/v1/fine_tuning/jobs", {"model": "{base}", **hyper(n_epochs="3")}, (*HP, "n_epochs")),
        ("/v1/fine_tuning/jobs", {"model": "{base}", **hyper(packing="true")}, (*HP, "packing")),
        ("/v1/fine_tuning/jobs", {"model": "{base}", "seed": "7"}, ("seed",)),
        ("/v1/fine_tuning/jobs", {"model": "{base}", "metadata": {"k": 1}}, ("metadata", "k")),
        ("/v1/completions", {"model": "{base}", "prompt": "a\x00"}, ("prompt",)),  # a union: no member in param
        ("/v1/completions", {"model": "{base}", "prompt": ["a", 1]}, ("prompt",)),
    ],
)  # fmt: skip
def test_strings_are_not_coerced_into_numbers_nor_numbers_into_booleans(
    client: TestClient,
    tenant: dict[str, str],
    tiny_model: Path,
    path: str,
    body: dict[str, Any],
    where: tuple[str, ...],
) -> None:
    body = json.loads(json.dumps(body).replace("{base}", str(tiny_model)))
    refused(client.post(path, json=body, headers=tenant), "body", *where)
    assert stored(tenant) == (0, 0)


def test_number_fields_still_take_integers(client: TestClient, tenant: dict[str, str], tiny_model: Path) -> None:
    response = client.post("/v1/generations", json={"prompt": "hi", "temperature": 1, "top_p": 1}, headers=tenant)
    assert response.status_code == 202, response.text
    response = fine_tune(client, tenant, tiny_model, **hyper(learning_rate_multiplier=2, lora_alpha=16))
    assert response.status_code == 200, response.text


# --- Caps ---------------------------------------------------------------------------------------------------


def test_stop_strings_are_capped_in_total_characters(client: TestClient, tenant: dict[str, str]) -> None:
    big = ["x" * 400] * 3
    message = refused(
        client.post("/v1/generations", json={"prompt": "hi", "stop": big}, headers=tenant), "body", "stop"
    )
    assert "1000" in message
    five = ["a", "b", "c", "d", "e"]
    refused(client.post("/v1/generations", json={"prompt": "hi", "stop": five}, headers=tenant), "body", "stop")
    assert (
        client.post("/v1/generations", json={"prompt": "hi", "stop": ["x" * 250] * 4}, headers=tenant).status_code
        == 202
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n_epochs", 10**12),
        ("batch_size", 10**12),
        ("max_steps", 10**12),
        ("save_every_steps", 10**12),
        ("eval_every_steps", 10**12),
        ("gradient_accumulation_steps", 10**6),
        ("lora_r", 10**6),
        ("max_seq_len", 10**6),
        ("n_epochs", 51),
        ("batch_size", 257),
        ("max_steps", 100_001),
    ],
)
def test_training_sizes_have_upper_bounds(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, name: str, value: int
) -> None:
    refused(fine_tune(client, tenant, tiny_model, **hyper(**{name: value})),
            "body", "method", "supervised", "hyperparameters", name)  # fmt: skip
    assert stored(tenant) == (0, 0)


def test_the_deprecated_hyperparameters_field_is_capped_too(
    client: TestClient, tenant: dict[str, str], tiny_model: Path
) -> None:
    refused(
        fine_tune(client, tenant, tiny_model, hyperparameters={"n_epochs": 1000}), "body", "hyperparameters", "n_epochs"
    )


def test_an_operator_can_raise_the_training_caps(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, max_train_epochs="200", max_train_batch_size="1024")
    response = fine_tune(client, tenant, tiny_model, **hyper(n_epochs=150, batch_size=1000))
    assert response.status_code == 200, response.text


def test_a_hub_sample_larger_than_max_records_is_refused(
    client: TestClient, tenant: dict[str, str], tiny_model: Path
) -> None:
    body = {"dataset": {"name": "tatsu-lab/alpaca", "sample_size": 10**9}}
    refused(fine_tune(client, tenant, tiny_model, **body), "body", "dataset", "sample_size")


def test_target_modules_are_checked_against_the_base_models_modules(
    client: TestClient, tenant: dict[str, str], tiny_model: Path
) -> None:
    ok = fine_tune(client, tenant, tiny_model, **hyper(target_modules=["c_attn", "mlp.c_proj"]))
    assert ok.status_code == 200, ok.text
    bad = fine_tune(client, tenant, tiny_model, **hyper(target_modules=["c_attn", "q_proj"]))
    message = refused(bad, "body", "method", "supervised", "hyperparameters", "target_modules", 1)
    assert "'q_proj'" in message and "c_fc" in message
    assert stored(tenant) == (1, 0)


def test_target_modules_of_a_base_model_the_gateway_cannot_read_are_left_to_the_worker(
    client: TestClient, tenant: dict[str, str]
) -> None:
    body = {"model": "some-org/unreadable-model", **hyper(target_modules=["q_proj"])}
    assert client.post("/v1/fine_tuning/jobs", json=body, headers=tenant).status_code == 200


def test_metadata_follows_openais_limits(client: TestClient, tenant: dict[str, str], tiny_model: Path) -> None:
    refused(fine_tune(client, tenant, tiny_model, metadata={"k" * 65: "v"}), "body", "metadata", "k" * 65, "[key]")
    refused(fine_tune(client, tenant, tiny_model, metadata={"k": "v" * 513}), "body", "metadata", "k")
    refused(fine_tune(client, tenant, tiny_model, metadata={"k\x01": "v"}), "body", "metadata", "k\x01", "[key]")
    assert fine_tune(client, tenant, tiny_model, metadata={"k": "line\nbreak\tand tab"}).status_code == 200


@pytest.mark.parametrize(
    ("field", "value"), [("logprobs", -5), ("best_of", 0), ("best_of", -(10**20)), ("logprobs", 10**30)]
)
def test_unsupported_completion_options_take_only_their_neutral_value(
    client: TestClient, tenant: dict[str, str], tiny_model: Path, field: str, value: int
) -> None:
    body = {"model": str(tiny_model), "prompt": "hi", field: value}
    refused(client.post("/v1/completions", json=body, headers=tenant), "body", field)


# --- Integers Python will not read, text with control characters in names -----------------------------------


def test_a_json_body_with_a_5000_digit_integer_answers_400(client: TestClient, tenant: dict[str, str]) -> None:
    body = '{"prompt": "hi", "seed": ' + "9" * 5000 + "}"
    response = client.post("/v1/generations", content=body, headers=tenant | {"content-type": "application/json"})
    assert response.status_code == 400 and "4300 digits" in response.json()["detail"]
    assert stored(tenant) == (0, 0)


@pytest.mark.parametrize(
    "content",
    [
        b'{"instruction": "a", "output": "b", "n": ' + b"9" * 5000 + b"}\n",
        b'[{"instruction": "a", "output": "b"}, ' + b"1" * 4301 + b"]",
    ],
)
def test_an_upload_with_a_5000_digit_integer_is_an_invalid_file(
    client: TestClient, tenant: dict[str, str], content: bytes
) -> None:
    response = client.post("/v1/files", files={"file": ("big.jsonl", content)}, headers=tenant)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_file", response.text
    assert "more than 4300 digits" in response.json()["detail"]
    assert stored(tenant) == (0, 0)


@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b"])
@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_an_uploaded_record_with_unstorable_text_is_an_invalid_file(
    client: TestClient, tenant: dict[str, str], field: str, text: str
) -> None:
    record = {"instruction": "a", "input": "", "output": "b"} | {field: text}
    response = client.post("/v1/files", files={"file": ("x.jsonl", json.dumps(record).encode())}, headers=tenant)
    assert response.status_code == 400, response.text
    assert f"line 1: field '{field}' contains" in response.json()["detail"]
    assert stored(tenant) == (0, 0)


@pytest.mark.parametrize("filename", [b"a\x00.jsonl", b"a\x01b.jsonl", b"a\x1b[31m.jsonl"])
def test_an_upload_whose_file_name_holds_control_characters_is_refused(
    client: TestClient, tenant: dict[str, str], filename: bytes
) -> None:
    boundary = b"llmqboundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + SAMPLE.read_bytes() + b"\r\n--" + boundary + b"--\r\n"
    )
    headers = tenant | {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}
    response = client.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 400 and "file name" in response.json()["detail"], response.text
    assert stored(tenant) == (0, 0)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("/v1/generations/gen-%00", ("path", "job_id")),
        ("/v1/jobs/a%01b", ("path", "job_id")),
        ("/v1/files/file-%1b", ("path", "file_id")),
        ("/v1/models/m%C2%85", ("path", "model_id")),
        ("/v1/jobs?after=%00", ("query", "after")),
        ("/v1/fine_tuning/jobs?after=a%0Ab", ("query", "after")),
        ("/v1/fine_tuning/jobs/ftjob-x/events?after=%7F", ("query", "after")),
    ],
)
def test_path_and_query_parameters_with_control_characters_are_refused_after_authentication(
    client: TestClient, tenant: dict[str, str], url: str, where: tuple[str, str]
) -> None:
    assert client.get(url).status_code == 401  # no key: the same 401 as for any other request
    refused(client.get(url, headers=tenant), *where)
