"""/v1/completions and /v1/models through the official openai SDK, against real processes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from shared.statuses import JobStatus
from tests.process_settings import configure
from tests.systems import System

pytestmark = pytest.mark.e2e


def sdk(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="unused", _strict_response_validation=True)


def base_model(system: System) -> str:
    return system.env["LLMQ_BASE_MODEL"]


def test_completion_matches_the_generation_job_for_the_same_prompt(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    completion = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0)
    job = httpx.post(
        f"{production_system.base_url}/v1/generations",
        json={"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0},
    ).json()
    job = httpx.get(f"{production_system.base_url}/v1/generations/{job['id']}", params={"wait": 30}).json()
    assert completion.object == "text_completion" and completion.model == model
    assert completion.choices[0].text == job["outputs"][0]["text"]
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens == job["usage"]["completion_tokens"]


def test_n_choices_with_a_seed_are_distinct_and_reproducible(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    ask = dict(model=model, prompt=["Hello", "Once upon"], max_tokens=6, temperature=1.0, n=2, seed=42)
    first = client.completions.create(**ask)  # type: ignore[call-overload]
    again = client.completions.create(**ask)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text


def test_echo_and_stop(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    free = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    echoed = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello" + free
    stop = free[3:5]
    cut = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.find(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("system_name", ["production_system", "embedded_system"])
def test_streamed_completion_adds_up_to_the_whole_text(system_name: str, request: pytest.FixtureRequest) -> None:
    system: System = request.getfixturevalue(system_name)
    client, model = sdk(system), base_model(system)
    ask = dict(model=model, prompt=["Below is an instruction", "Hi"], max_tokens=24, temperature=0, stop=["\n\n"])
    whole = client.completions.create(**ask)  # type: ignore[call-overload]
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="x").completions.create(**ask, stream=True):  # type: ignore[call-overload]
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_stream_sends_deltas_before_the_end_and_finishes_with_done(production_system: System) -> None:
    body = {"model": base_model(production_system), "prompt": "Hello", "max_tokens": 40, "temperature": 0}
    lines = []
    with httpx.stream("POST", f"{production_system.base_url}/v1/completions", json=body | {"stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' in lines[-2]
    deltas = [line for line in lines[:-2] if '"finish_reason": null' in line]
    assert len(deltas) > 1  # text arrived token by token, not only at the end


def test_models_lists_the_base_model(production_system: System) -> None:
    ids = [m.id for m in sdk(production_system).models.list()]
    assert base_model(production_system) in ids


@pytest.mark.parametrize(
    "extra",
    [{"n": 99}, {"logprobs": 6}, {"max_tokens": 100_000}, {"prompt": [[1, 2, 3]]}, {"best_of": 2}],
)
def test_unsupported_or_excessive_options_answer_400_naming_the_param(
    production_system: System, extra: dict[str, object]
) -> None:
    body = {"model": base_model(production_system), "prompt": "Hi"} | extra
    for stream in (False, True):
        response = httpx.post(f"{production_system.base_url}/v1/completions", json=body | {"stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == next(iter(extra)), error


def test_unknown_model_answers_404_through_the_sdk(production_system: System) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk(production_system).completions.create(model="ft:nope", prompt="Hi")


def test_a_streamed_completion_that_times_out_cancels_its_queued_job(
    postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    configure(  # no worker consumes quiet_redis_url: the job stays queued until the stream gives up
        monkeypatch,
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model="test-base-model",
        data_dir=str(tmp_path),
        completion_timeout_seconds="0.5",
    )
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import Job

    body = {"model": "test-base-model", "prompt": "Hi", "stream": True}
    with TestClient(create_app()) as client:
        response = client.post("/v1/completions", json=body)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1]["error"]["code"] == "timeout", response.text
    job_id = events[-1]["error"]["message"].split()[1]
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.CANCELLED
