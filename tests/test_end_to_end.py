"""The whole flow through real processes: HTTP gateway -> database row -> broker -> Celery worker
-> model -> row -> client, on Postgres + Redis and on the embedded default."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.systems import System

pytestmark = pytest.mark.e2e


def submit_and_wait(system: System, body: dict[str, object], timeout: float = 60) -> dict[str, object]:
    job = httpx.post(f"{system.base_url}/v1/generations", json=body, timeout=10)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        system.children.check_alive()
        got = httpx.get(f"{system.base_url}/v1/generations/{job_id}", params={"wait": 10}, timeout=20).json()
        if got["status"] not in ("queued", "running"):
            return got
    raise AssertionError(f"job {job_id} not finished after {timeout} s")


@pytest.mark.parametrize("system_name", ["production_system", "embedded_system"])
def test_generation_job_runs_end_to_end(system_name: str, request: pytest.FixtureRequest) -> None:
    system: System = request.getfixturevalue(system_name)
    body = {"prompts": ["Hello there", "Below is an instruction"], "max_tokens": 5, "temperature": 0}
    job = submit_and_wait(system, body)
    assert job["status"] == "succeeded", job
    outputs = job["outputs"]
    assert isinstance(outputs, list) and len(outputs) == 2
    for output in outputs:
        assert output["finish_reason"] in ("stop", "length")
        assert output["completion_tokens"] <= 5
        assert output["prompt_tokens"] > 0
    assert job["usage"]["completion_tokens"] == sum(o["completion_tokens"] for o in outputs)  # type: ignore[index]
    assert job["queue_seconds"] is not None and job["run_seconds"] is not None
    listed = httpx.get(f"{system.base_url}/v1/jobs", params={"kind": "generate"}).json()
    assert job["id"] in [j["id"] for j in listed["data"]]


def test_wait_returns_as_soon_as_the_job_finishes(production_system: System) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    submit_and_wait(production_system, body)  # warm the worker
    job = httpx.post(f"{production_system.base_url}/v1/generations", json=body).json()
    started = time.monotonic()
    got = httpx.get(f"{production_system.base_url}/v1/generations/{job['id']}", params={"wait": 30}, timeout=40)
    assert got.json()["status"] == "succeeded"
    assert time.monotonic() - started < 5  # far from the 30 s it was allowed to wait


def test_greedy_output_is_the_same_on_both_deployments(production_system: System, embedded_system: System) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    a = submit_and_wait(production_system, body)["outputs"]
    b = submit_and_wait(embedded_system, body)["outputs"]
    assert a == b


def test_too_long_prompt_fails_alone_while_its_batch_neighbours_succeed(production_system: System) -> None:
    long_job = httpx.post(
        f"{production_system.base_url}/v1/generations",
        json={"prompt": "word " * 3000, "max_tokens": 16, "temperature": 0},
    ).json()
    ok = submit_and_wait(production_system, {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    failed = httpx.get(f"{production_system.base_url}/v1/generations/{long_job['id']}", params={"wait": 30}).json()
    assert ok["status"] == "succeeded"
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "context_length_exceeded"
    assert "context" in failed["error"]["message"]


def test_model_that_fails_to_load_fails_the_job_and_the_worker_keeps_serving(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.servers import redis_db
    from tests.systems import start_system

    data = tmp_path_factory.mktemp("broken-model")
    env = {
        "LLMQ_DATABASE_URL": postgres_url,
        "LLMQ_BROKER_URL": redis_db(14),  # its own queues, apart from the other systems' workers
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": str(data / "no-such-model"),
        "HF_HUB_OFFLINE": "1",
    }
    system = start_system(env, data / "logs")
    try:
        body = {"prompt": "Hello", "max_tokens": 2}
        first = submit_and_wait(system, body)
        second = submit_and_wait(system, body)
        for job in (first, second):
            assert job["status"] == "failed"
            assert job["error"]["code"] == "model_load_failed"
            assert "no-such-model" in job["error"]["message"]
        system.children.check_alive()
    finally:
        system.children.stop_all()


def test_a_job_submitted_on_one_gateway_is_polled_and_waited_for_on_another(production_system: System) -> None:
    from cli.processes import gateway_command, wait_ready
    from tests.systems import free_port

    port = free_port()
    production_system.children.start("gateway-2", gateway_command("127.0.0.1", port))
    other = f"http://127.0.0.1:{port}"
    try:
        wait_ready(other, production_system.children)
        body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        submitted = httpx.post(f"{production_system.base_url}/v1/generations", json=body, timeout=10)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        # The tiny model may finish the job before this poll: any status proves the other gateway sees the row.
        seen = httpx.get(f"{other}/v1/generations/{job_id}", timeout=10).json()
        assert seen["id"] == job_id and seen["status"] in ("queued", "running", "succeeded"), seen
        # The other gateway's ?wait= wakes on the worker's job-finished notification (Redis), not its own work.
        started = time.monotonic()
        waited = httpx.get(f"{other}/v1/generations/{job_id}", params={"wait": 30}, timeout=40).json()
        assert waited["status"] == "succeeded", waited
        assert time.monotonic() - started < 25
        polled = httpx.get(f"{production_system.base_url}/v1/generations/{job_id}", timeout=10).json()
        assert polled["outputs"] == waited["outputs"]
        # A streamed completion on the other gateway gets the worker's deltas through Redis too.
        model = production_system.env["LLMQ_BASE_MODEL"]
        stream_body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{other}/v1/completions", json=stream_body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", lines
    finally:
        production_system.children.stop("gateway-2")
