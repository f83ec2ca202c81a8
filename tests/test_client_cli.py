"""The Python client and the `llmq` command: against a real gateway (Postgres + Redis + generate worker),
and, for what only a client does (retries, backoff, streams, following a fine-tune), against an
httpx MockTransport standing in for the server."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cli import api_commands
from cli.fine_tune_progress import progress_fields
from cli.hyperparameters import parse_hyperparameters, parse_value
from cli.main import app
from cli.processes import wait_ready
from client import (
    AuthError,
    LlmqClient,
    LlmqError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
    UnreachableError,
    ValidationError,
)
from client.retries import RetryPolicy
from shared.schemas import FineTuningEvent, FineTuningJob, FineTuningJobHyperparameters
from tests.process_settings import configure
from tests.systems import System, free_port

SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"
FAKE_URL = "http://llmq.test"

Handler = Callable[[httpx.Request], httpx.Response]


def mock_client(handler: Handler, sleeps: list[float] | None = None, **kwargs: Any) -> LlmqClient:
    record = sleeps.append if sleeps is not None else (lambda _seconds: None)
    return LlmqClient(FAKE_URL, api_key="", transport=httpx.MockTransport(handler), sleep=record, **kwargs)


def error(status: int, message: str, code: str = "x", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"detail": message, "error": {"message": message, "type": "server_error", "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# Retries, backoff and error mapping (client-only behaviour, MockTransport)
# ----------------------------------------------------------------------------------------------------------


def test_503_is_retried_after_the_seconds_retry_after_names() -> None:
    answers = iter([error(503, "database unavailable", headers={"Retry-After": "2"})] * 2)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return next(answers, httpx.Response(200, json={"status": "ok"}))

    sleeps: list[float] = []
    with mock_client(handler, sleeps) as client:
        assert client.healthz() == {"status": "ok"}
    assert len(calls) == 3
    assert sleeps == [2.0, 2.0]


def test_503_without_retry_after_backs_off_exponentially_then_raises_unavailable() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return error(503, "database unavailable", code="database_unavailable")

    sleeps: list[float] = []
    with mock_client(handler, sleeps, retries=3, backoff=1.0) as client, pytest.raises(UnavailableError) as caught:
        client.list_jobs()
    assert len(calls) == 4  # the first attempt and three retries
    for attempt, slept in enumerate(sleeps):
        ceiling = 2.0**attempt
        assert ceiling / 2 <= slept <= ceiling  # equal jitter: at least half, at most all of the doubling delay
    assert caught.value.status_code == 503
    assert caught.value.code == "database_unavailable"
    assert caught.value.message == "database unavailable"


def test_429_is_retried_and_a_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    answers = iter(
        [error(429, "slow down", headers={"Retry-After": "1"}), error(429, "later", headers={"Retry-After": "3600"})]
    )
    sleeps: list[float] = []
    with mock_client(lambda _r: next(answers), sleeps) as client, pytest.raises(RateLimitError) as caught:
        client.list_models()
    assert sleeps == [1.0]
    assert caught.value.retry_after == 3600


def test_a_refused_connection_is_retried_then_reported_as_unreachable() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    sleeps: list[float] = []
    with mock_client(handler, sleeps, retries=2) as client, pytest.raises(UnreachableError) as caught:
        client.create_generation("hi")  # a POST too: the request never left
    assert len(calls) == 3 and len(sleeps) == 2
    assert "cannot reach llmq at http://llmq.test" in caught.value.message


def test_a_read_timeout_retries_a_get_but_never_a_post_that_may_have_created_a_job() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadTimeout("timed out", request=request)

    client = mock_client(handler, retries=2)
    with client, pytest.raises(UnreachableError, match="no answer from"):
        client.create_generation("hi")
        assert calls == ["POST"]
        calls.clear()
        with pytest.raises(UnreachableError):
            client.get_job("gen-1")
        assert calls == ["GET"] * 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, AuthError), (403, AuthError), (404, NotFoundError), (400, ValidationError), (500, LlmqError)],
)
def test_error_answers_map_to_the_exception_tree(status: int, kind: type[LlmqError]) -> None:
    client = mock_client(lambda _r: error(status, "the message", code="the_code"))
    with client, pytest.raises(kind) as caught:
        client.get_job("gen-1")
    assert type(caught.value) is kind
    assert (caught.value.message, caught.value.code, caught.value.status_code) == ("the message", "the_code", status)


def test_a_422_field_list_becomes_a_validation_error_naming_each_field() -> None:
    detail = [
        {"type": "value_error", "loc": ["body", "max_tokens"], "msg": "must be at most 256", "input": None},
        {"type": "value_error", "loc": ["body", "prompts", 1], "msg": "prompt must not be empty", "input": None},
    ]
    client = mock_client(lambda _r: httpx.Response(422, json={"detail": detail}))
    with client, pytest.raises(ValidationError) as caught:
        client.create_generation(["a", ""], max_tokens=999)
    assert caught.value.message == "max_tokens: must be at most 256; prompts.1: prompt must not be empty"
    assert caught.value.errors == detail


def test_a_non_json_error_answer_still_reads_as_one_line() -> None:
    client = mock_client(lambda _r: httpx.Response(502, text="<html>\n<b>Bad gateway</b>\n</html>"))
    with client, pytest.raises(UnavailableError, match=r"^HTTP 502 Bad Gateway: <html> <b>Bad gateway</b> </html>$"):
        client.get_job("gen-1")


def test_api_key_is_sent_as_a_bearer_token_from_the_argument_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("LLMQ_API_KEY", "from-env")
    for api_key in ("secret", None, ""):
        with LlmqClient(FAKE_URL, api_key=api_key, transport=httpx.MockTransport(handler)) as client:
            client.healthz()
    assert seen == ["Bearer secret", "Bearer from-env", None]


def test_an_upload_retried_after_503_sends_the_whole_file_again(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(SAMPLE.read_bytes())
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            return error(503, "busy", headers={"Retry-After": "0"})
        file = {"id": "file-1", "bytes": 1, "created_at": 0, "filename": "data.jsonl", "purpose": "fine-tune"}
        return httpx.Response(200, json=file | {"records": 400, "sha256": "0" * 64})

    with mock_client(handler) as client:
        assert client.upload_file(data).records == 400
    assert len(bodies) == 2 and len(bodies[0]) == len(bodies[1])  # the multipart boundaries differ
    assert all(SAMPLE.read_bytes() in body and b'name="purpose"' in body for body in bodies)


def test_retry_policy_gives_up_after_its_retries() -> None:
    policy = RetryPolicy(retries=2, backoff=0.1)
    assert policy.delay(0) is not None and policy.delay(1) is not None
    assert policy.delay(2) is None
    assert policy.delay(0, retry_after=5) == 5


def test_a_streamed_completion_yields_each_chunk_until_done() -> None:
    chunks = [{"id": "cmpl-1", "choices": [{"index": 0, "text": t}]} for t in ("Hel", "lo")]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ": keep-alive\n\ndata: [DONE]\n\n"
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.read()))
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    with mock_client(handler) as client:
        got = list(client.stream_completion(model="m", prompt="Hi", max_tokens=2))
    assert got == chunks
    assert seen[0]["stream"] is True and seen[0]["prompt"] == "Hi"


def test_an_error_event_in_a_stream_raises() -> None:
    stream = 'data: {"error": {"message": "worker died", "code": "worker_lost"}}\n\n'
    client = mock_client(lambda _r: httpx.Response(200, text=stream))
    with client, pytest.raises(LlmqError, match="worker died"):
        list(client.stream_completion(model="m", prompt="Hi"))


# ----------------------------------------------------------------------------------------------------------
# Option parsing and progress figures
# ----------------------------------------------------------------------------------------------------------


def test_hyperparameter_values_parse_to_the_type_they_look_like() -> None:
    parsed = parse_hyperparameters(
        ["n_epochs=3", "learning_rate_multiplier=0.5", "packing=true", "batch_size=auto", 'target_modules=["c_attn"]']
    )
    assert parsed == {
        "n_epochs": 3,
        "learning_rate_multiplier": 0.5,
        "packing": True,
        "batch_size": "auto",
        "target_modules": ["c_attn"],
    }
    assert parse_value("1e-4") == 1e-4 and parse_value("False") is False and parse_value("cosine") == "cosine"


@pytest.mark.parametrize("items", [["n_epochs"], ["=3"], ["a=1", "a=2"], ["target_modules=[c_attn"]])
def test_malformed_hyperparameters_are_usage_errors(items: list[str]) -> None:
    import typer

    with pytest.raises(typer.BadParameter):
        parse_hyperparameters(items)


def test_progress_fields_read_the_workers_step_event() -> None:
    data = {
        "step": 20,
        "total_steps": 150,
        "train_loss": 1.23456,
        "learning_rate": 1e-4,
        "trained_tokens": 40000,
        "tokens_per_second": 812.4,
        "eta_seconds": 95.0,
    }
    assert progress_fields(data) == {
        "completed": 20,
        "total": 150,
        "loss": "1.2346",
        "speed": "812 tok/s",
        "eta": "1m 35s",
    }
    assert progress_fields({"total_steps": 150, "start_step": 0}) == {"total": 150, "completed": 0}
    assert progress_fields(None) == {}


# ----------------------------------------------------------------------------------------------------------
# The client against a real gateway (production_system: Postgres, Redis, generate worker, no train worker)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def client(production_system: System) -> Any:
    with LlmqClient(production_system.base_url, api_key="") as llmq:
        yield llmq


def base_model(client: LlmqClient) -> str:
    return next(m.id for m in client.list_models().data if m.parent is None)


@pytest.mark.e2e
def test_generation_submitted_and_waited_for_through_the_client(client: LlmqClient) -> None:
    job = client.create_generation(["Hello there", "Once upon"], max_tokens=4, temperature=0)
    assert job.status == "queued" and job.id.startswith("gen-")
    done = client.wait_generation(job.id, timeout=60)
    assert done.status == "succeeded"
    assert done.outputs is not None and [o.index for o in done.outputs] == [0, 1]
    assert all(o.completion_tokens <= 4 for o in done.outputs)
    assert client.wait(job.id) == done  # the generic wait finds its kind
    assert client.get_job(job.id).kind == "generate"
    assert job.id in [j.id for j in client.list_jobs(kind="generate", status="succeeded", limit=100).data]


@pytest.mark.e2e
def test_invalid_generation_raises_validation_error_naming_the_field(client: LlmqClient) -> None:
    with pytest.raises(ValidationError, match="max_tokens") as caught:
        client.create_generation("Hi", max_tokens=0)
    assert caught.value.status_code == 422 and caught.value.errors


@pytest.mark.e2e
def test_files_upload_list_get_delete_round_trip(client: LlmqClient) -> None:
    uploaded = client.upload_file(SAMPLE)
    assert uploaded.records == 400 and uploaded.filename == SAMPLE.name
    assert uploaded in client.list_files().data
    assert client.get_file(uploaded.id) == uploaded
    assert client.delete_file(uploaded.id).deleted
    with pytest.raises(NotFoundError, match="not found"):
        client.get_file(uploaded.id)


@pytest.mark.e2e
def test_fine_tune_created_then_cancelled_while_queued(client: LlmqClient) -> None:
    uploaded = client.upload_file(SAMPLE)
    model = base_model(client)
    job = client.create_fine_tuning_job(
        model=model, training_file=uploaded.id, suffix="cli-test", hyperparameters={"n_epochs": 1, "lora_r": 8}
    )
    assert job.status == "queued" and job.model == model
    assert job.hyperparameters.n_epochs == 1 and job.method["supervised"]["hyperparameters"]["lora_r"] == 8
    assert job.id in [j.id for j in client.list_fine_tuning_jobs(limit=100).data]
    cancelled = client.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert client.wait(job.id, timeout=5).status == "cancelled"
    messages = [e.message for e in client.follow_events(job.id, poll_interval=0.1)]  # ends: the job has ended
    assert messages == ["Created fine-tuning job", "Cancellation requested"]
    assert client.list_fine_tuning_checkpoints(job.id).data == []
    assert client.get_job_detail(job.id) == client.get_fine_tuning_job(job.id)


@pytest.mark.e2e
def test_models_are_found_by_ids_that_hold_slashes(client: LlmqClient) -> None:
    model = base_model(client)
    assert "/" in model  # a local path in this system
    assert client.get_model(model).id == model
    with pytest.raises(NotFoundError):
        client.get_model("no/such-model")
    assert client.readyz().status in ("ok", "degraded")  # degraded: this system runs no train worker


# ----------------------------------------------------------------------------------------------------------
# The llmq command against a real gateway
# ----------------------------------------------------------------------------------------------------------


def llmq(system_url: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--url", system_url, *args])


@pytest.mark.e2e
def test_llmq_generate_prints_the_output_and_jobs_lists_it(production_system: System) -> None:
    url = production_system.base_url
    result = llmq(url, "generate", "--max-tokens", "3", "--temperature", "0", "--json", "Hello there")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and len(job["outputs"]) == 1
    plain = llmq(url, "generate", "--max-tokens", "3", "--temperature", "0", "Hello there")
    assert plain.exit_code == 0 and plain.stdout == job["outputs"][0]["text"] + "\n"
    listed = llmq(url, "jobs", "--kind", "generate", "--limit", "100")
    assert listed.exit_code == 0 and job["id"] in listed.stdout
    status = llmq(url, "status", job["id"])
    assert status.exit_code == 0 and "succeeded" in status.stdout
    cancel = llmq(url, "cancel", job["id"])
    assert cancel.exit_code == 1
    assert one_line(cancel.stderr) == f"error: {job['id']} already succeeded; nothing to cancel"


@pytest.mark.e2e
def test_llmq_upload_of_a_bad_file_prints_one_line_naming_the_record(production_system: System, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    result = llmq(production_system.base_url, "upload", str(bad))
    assert result.exit_code == 1
    assert one_line(result.stderr) == "error: bad.jsonl: line 2: missing required field 'output'"


@pytest.mark.e2e
def test_llmq_status_of_an_unknown_id_exits_1_with_one_line(production_system: System) -> None:
    result = llmq(production_system.base_url, "status", "gen-doesnotexist")
    assert result.exit_code == 1
    assert one_line(result.stderr) == "error: job 'gen-doesnotexist' not found"


@pytest.mark.e2e
def test_llmq_finetune_cancel_status_and_events(production_system: System) -> None:
    url = production_system.base_url
    created = llmq(url, "finetune", "--file", str(SAMPLE), "-p", "n_epochs=1", "-p", "lora_r=4", "--suffix", "cli")
    assert created.exit_code == 0, created.output
    job_id = created.stdout.split()[0]
    assert job_id.startswith("ftjob-") and "uploaded" in created.stderr
    cancelled = llmq(url, "cancel", job_id)
    assert (cancelled.exit_code, cancelled.stdout) == (0, f"{job_id} cancelled\n")
    assert llmq(url, "cancel", job_id).stdout == f"{job_id} cancelled\n"  # cancelling twice is no error
    status = llmq(url, "status", job_id)
    assert status.exit_code == 1 and "cancelled" in status.stdout  # a cancelled job's status exits 1
    events = llmq(url, "events", job_id)
    assert events.exit_code == 0 and "Cancellation requested" in events.stdout
    followed = llmq(url, "events", job_id, "--follow")
    assert followed.exit_code == 1 and one_line(followed.stderr) == f"error: {job_id} cancelled"


def test_llmq_exits_3_with_one_line_when_the_server_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["--url", url, "--retries", "0", "jobs"])
    assert result.exit_code == 3
    assert one_line(result.stderr).startswith(f"error: cannot reach llmq at {url}")


def test_a_url_without_scheme_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["--url", "localhost:8000", "jobs"])
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("error: Invalid value for --url: 'localhost:8000' is not an http")


def test_the_installed_llmq_command_prints_no_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).parent / "llmq"), "--url", url, "--retries", "0", "status", "gen-1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 3
    assert one_line(done.stderr).startswith("error: cannot reach llmq")
    usage = subprocess.run([*command[:-2], "finetune", "--file", "x", "-p", "oops"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "expected key=value" in one_line(usage.stderr)


def test_keys_create_list_and_revoke_in_the_database(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import api_keys
    from shared.db import get_sessionmaker

    configure(monkeypatch, database_url=postgres_url)
    created = CliRunner().invoke(app, ["keys", "create", "--tenant", "acme", "--name", "ci"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    with get_sessionmaker()() as session:
        found = api_keys.authenticate(session, token)
    assert found is not None and found[0] == "acme"
    key_id = found[1]
    listed = CliRunner().invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and key_id in listed.stdout and token not in listed.stdout
    assert CliRunner().invoke(app, ["keys", "revoke", key_id]).stdout == f"{key_id} revoked\n"
    again = CliRunner().invoke(app, ["keys", "revoke", key_id])
    assert again.exit_code == 1 and one_line(again.stderr) == f"error: no live API key {key_id!r}"


# ----------------------------------------------------------------------------------------------------------
# `llmq finetune --follow` against a scripted server (no train worker runs in these tests)
# ----------------------------------------------------------------------------------------------------------


def ft_job(status: str, fine_tuned_model: str | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
    return FineTuningJob(
        id="ftjob-1",
        created_at=1_700_000_000,
        finished_at=None,
        model="base",
        fine_tuned_model=fine_tuned_model,
        status=status,  # type: ignore[arg-type]
        training_file="file-1",
        validation_file=None,
        hyperparameters=FineTuningJobHyperparameters(n_epochs=1, batch_size=8, learning_rate_multiplier=1.0),
        method={},
        result_files=[],
        trained_tokens=None,
        estimated_finish=None,
        error=error,  # type: ignore[arg-type]
        seed=1,
        user_provided_suffix=None,
        metadata=None,
        dataset=None,
        metrics=None,
    ).model_dump(mode="json")


class ScriptedTraining:
    """Answers what `finetune --follow` asks; every read of the job's status moves it one stage on."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.reads = 0
        self.job = ft_job("queued")
        self.events: list[FineTuningEvent] = []
        self.created: dict[str, Any] = {}
        self._add("Created fine-tuning job")

    def _add(self, message: str, type: str = "message", data: dict[str, Any] | None = None) -> None:
        number = len(self.events) + 1
        event = FineTuningEvent(id=f"ftevent-{number}", created_at=1_700_000_000 + number, level="info",
                                message=message, type=type, data=data)  # fmt: skip
        self.events.append(event)

    def _step(self, step: int) -> None:
        data = {"step": step, "total_steps": 4, "train_loss": 2.0 / step, "learning_rate": 1e-4,
                "trained_tokens": 100 * step, "tokens_per_second": 50.0, "eta_seconds": 2.0 * (4 - step)}  # fmt: skip
        self._add(f"Step {step}/4: training loss={2.0 / step:.4f}", "metrics", data)

    def _advance(self) -> dict[str, Any]:
        self.reads += 1
        if self.reads == 1:
            return ft_job("queued")
        if self.reads == 2:
            self._add("Training for 4 steps.", data={"total_steps": 4, "start_step": 0})
            self._step(2)
            return ft_job("running")
        if self.reads == 3:
            self._step(4)
            return ft_job("running")
        if self.outcome == "succeeded":
            self._add("New fine-tuned model created: ft:base:llmq:ftjob-1")
            return ft_job("succeeded", fine_tuned_model="ft:base:llmq:ftjob-1")
        self._add("Out of memory", data=None)
        return ft_job("failed", error={"code": "training_failed", "message": "out of memory"})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "created": 0, "root": "base"}]})
        if path == "/v1/fine_tuning/jobs" and request.method == "POST":
            self.created = json.loads(request.read())
            return httpx.Response(200, json=ft_job("queued"))
        if path == "/v1/jobs/ftjob-1":
            if self.reads < 4:
                self.job = self._advance()
            summary = {"id": "ftjob-1", "kind": "train", "status": self.job["status"], "model": "base", "attempt": 1,
                       "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None,
                       "error": self.job["error"]}  # fmt: skip
            return httpx.Response(200, json=summary)
        if path == "/v1/fine_tuning/jobs/ftjob-1":
            return httpx.Response(200, json=self.job)
        if path == "/v1/fine_tuning/jobs/ftjob-1/events":
            newest_first = self.events[::-1]
            after = request.url.params.get("after")
            if after is not None:
                newest_first = newest_first[[e.id for e in newest_first].index(after) + 1 :]
            limit = int(request.url.params.get("limit", 20))
            page = [e.model_dump(mode="json") for e in newest_first[:limit]]
            return httpx.Response(200, json={"data": page, "has_more": len(newest_first) > limit})
        return error(404, f"no route {path}")


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> ScriptedTraining:
    server = ScriptedTraining(request.param)
    factory = functools.partial(LlmqClient, transport=httpx.MockTransport(server), sleep=lambda _s: None)
    monkeypatch.setattr(api_commands, "LlmqClient", factory)
    return server


@pytest.mark.parametrize("scripted", ["succeeded"], indirect=True)
def test_finetune_follow_shows_progress_and_prints_the_model_id(scripted: ScriptedTraining) -> None:
    args = ["--url", FAKE_URL, "finetune", "--file", "file-1", "--follow", "-p", "n_epochs=1", "-p", "packing=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "ft:base:llmq:ftjob-1\n"
    assert "Training for 4 steps." in result.stderr and "New fine-tuned model created" in result.stderr
    assert "Step 2/4" not in result.stderr  # step events feed the bar, not the log
    assert "4/4" in result.stderr  # the bar's last state
    assert scripted.created["training_file"] == "file-1" and scripted.created["model"] == "base"
    assert scripted.created["method"]["supervised"]["hyperparameters"] == {"n_epochs": 1, "packing": True}


@pytest.mark.parametrize("scripted", ["failed"], indirect=True)
def test_finetune_follow_of_a_failing_job_exits_1_with_its_error(scripted: ScriptedTraining) -> None:
    result = CliRunner().invoke(app, ["--url", FAKE_URL, "finetune", "--file", "file-1", "--follow"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == "error: ftjob-1 failed: out of memory"


# ----------------------------------------------------------------------------------------------------------
# `llmq jobs` and `llmq models`: 80 columns on a terminal, plain tab-separated lines in a pipe
# ----------------------------------------------------------------------------------------------------------

LONG_ERROR = "the worker ran out of memory while decoding the batch; retry with fewer tokens"
LISTED_JOBS = [
    {"id": "ftjob-0123456789abcdef01234567", "kind": "train", "status": "failed", "model": "openai-community/gpt2",
     "created_at": "2026-01-02T03:04:05Z", "started_at": None, "finished_at": None, "attempt": 1,
     "error": {"code": "training_failed", "message": LONG_ERROR}},
    {"id": "gen-0123456789abcdef01234567", "kind": "generate", "status": "succeeded",
     "model": "ft:gpt2:a-long-suffix:ftjob-0123456789abcdef01234567", "created_at": "2026-01-02T03:04:06Z",
     "started_at": None, "finished_at": None, "attempt": 1, "error": None},
]  # fmt: skip
LISTED_MODELS = [
    {"id": "openai-community/gpt2", "created": 0, "root": "openai-community/gpt2"},
    {"id": "ft:gpt2:a-long-suffix:ftjob-0123456789abcdef01234567:ckpt-step-1000", "created": 1_767_322_800,
     "parent": "ft:gpt2:a-long-suffix:ftjob-0123456789abcdef01234567", "root": "openai-community/gpt2"},
]  # fmt: skip


@pytest.fixture
def listing_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            return httpx.Response(200, json={"object": "list", "data": LISTED_JOBS, "has_more": False})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": LISTED_MODELS})
        return error(404, "no route")

    factory = functools.partial(LlmqClient, transport=httpx.MockTransport(answer), sleep=lambda _s: None)
    monkeypatch.setattr(api_commands, "LlmqClient", factory)


@pytest.mark.parametrize("command", ["jobs", "models"])
def test_listings_fit_an_80_column_terminal_without_cutting_an_id(
    listing_server: None, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from rich.console import Console

    monkeypatch.setattr(api_commands, "Console", functools.partial(Console, force_terminal=True, width=80))
    result = CliRunner().invoke(app, ["--url", FAKE_URL, command])
    assert result.exit_code == 0, result.output
    assert "\x1b[" in result.stdout  # styled, as on a terminal
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout).splitlines()
    assert plain[0].split()[0] == "ID"
    assert max(len(line) for line in plain) <= 80, "\n".join(plain)
    ids = [row["id"] for row in (LISTED_JOBS if command == "jobs" else LISTED_MODELS)]
    first_words = [line.split()[0] for line in plain if line.strip()]
    assert all(i in first_words for i in ids)  # each id whole on one line, copyable
    assert "…" not in result.stdout


def test_listings_in_a_pipe_are_tab_separated_lines_with_nothing_cut(listing_server: None) -> None:
    jobs = CliRunner().invoke(app, ["--url", FAKE_URL, "jobs"])
    assert jobs.exit_code == 0, jobs.output
    assert jobs.stdout.splitlines() == [
        "ftjob-0123456789abcdef01234567\ttrain\tfailed\t2026-01-02T03:04:05Z\topenai-community/gpt2\t"
        f"training_failed: {LONG_ERROR}",
        "gen-0123456789abcdef01234567\tgenerate\tsucceeded\t2026-01-02T03:04:06Z\t"
        "ft:gpt2:a-long-suffix:ftjob-0123456789abcdef01234567\t-",
    ]
    models = CliRunner().invoke(app, ["--url", FAKE_URL, "models"])
    assert models.exit_code == 0, models.output
    assert [line.split("\t") for line in models.stdout.splitlines()] == [
        ["openai-community/gpt2", "-", "-"],
        [LISTED_MODELS[1]["id"], "2026-01-02T03:00:00Z", LISTED_MODELS[1]["parent"]],
    ]


# ----------------------------------------------------------------------------------------------------------
# `llmq finetune`: hyperparameters checked by the gateway's own rules before the file is uploaded
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("n_epochs=0", "n_epochs must be at least 1 or 'auto'"),
        ("n_epochs=1.5", "n_epochs: Input should be a valid integer (got 1.5)"),
        ("lora_r=1000", "lora_r: Input should be less than or equal to 256 (got 1000)"),
        ("learning_rate_multiplier=500", "learning_rate_multiplier must be in (0, 100] or 'auto'"),
        ("lr_scheduler=cosin", "lr_scheduler: Input should be 'linear', 'cosine'"),
        ("epochs=3", "epochs: Extra inputs are not permitted"),
    ],
)
def test_finetune_refuses_a_bad_hyperparameter_before_uploading_anything(
    monkeypatch: pytest.MonkeyPatch, value: str, named: str
) -> None:
    requests: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        return error(500, "unexpected")

    factory = functools.partial(LlmqClient, transport=httpx.MockTransport(record), sleep=lambda _s: None)
    monkeypatch.setattr(api_commands, "LlmqClient", factory)
    result = CliRunner().invoke(app, ["--url", FAKE_URL, "finetune", "--file", str(SAMPLE), "-p", value])
    assert result.exit_code == 2, result.output
    assert named in " ".join(result.stderr.split()) and "--hyperparameter" in result.stderr
    assert requests == []  # nothing uploaded, no job created


# ----------------------------------------------------------------------------------------------------------
# `llmq up` and `llmq demo`: a busy port named with its holder; only their own gateway is ever "up"
# ----------------------------------------------------------------------------------------------------------


def test_llmq_up_names_the_busy_gateway_port_and_its_holder_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        configure(monkeypatch, api_port=str(port), data_dir=str(tmp_path))
        result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 1, result.output
    line = " ".join(result.stderr.split())
    assert f"port {port} on 127.0.0.1 (the gateway) is in use, held by pid {os.getpid()}: " in line
    assert "choose another port with LLMQ_API_PORT=<port>" in line
    assert "is up" not in result.output
    assert not (tmp_path / "logs").exists()  # no child started


class _Healthz(http.server.BaseHTTPRequestHandler):
    instance: str | None = None

    def do_GET(self) -> None:
        body = {"status": "ok"} if self.instance is None else {"status": "ok", "instance": self.instance}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.mark.parametrize("reported", [None, "llmq-someone-else"])
def test_waiting_for_our_gateway_refuses_another_server_on_its_port(reported: str | None) -> None:
    handler = type("Foreign", (_Healthz,), {"instance": reported})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RuntimeError, match=r"another server answers at .* not the gateway this command started"):
            wait_ready(url, timeout=5, instance="llmq-ours")
        ours = type("Ours", (_Healthz,), {"instance": "llmq-ours"})
        server.RequestHandlerClass = ours
        wait_ready(url, timeout=5, instance="llmq-ours")  # the one that reports our id is ready
        server.shutdown()


def test_the_gateway_reports_the_instance_id_its_starter_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.routes.health import healthz

    configure(monkeypatch, instance_id="llmq-123-abc")
    assert healthz() == {"status": "ok", "instance": "llmq-123-abc"}


def test_status_of_a_finished_fine_tune_prints_its_sample_answers_beside_the_base_models() -> None:
    from cli import views

    job = FineTuningJob.model_validate(
        ft_job("succeeded", fine_tuned_model="ft:base:llmq:ftjob-1")
        | {"samples": [{"prompt": "Name a primary\ncolour.", "reference": "Blue.", "fine_tuned": " Red.", "base": ""}]}
    )
    lines = views.fine_tune_lines(job)
    start = lines.index("samples   greedy answers to 1 validation prompts")
    assert lines[start:] == [
        "samples   greedy answers to 1 validation prompts",
        "  [1] Name a primary colour.",
        "      fine-tuned  Red.",
        "      base        (empty)",
        "      reference   Blue.",
    ]
    running = FineTuningJob.model_validate(ft_job("running"))
    assert not any(line.startswith("samples") for line in views.fine_tune_lines(running))
