"""OpenAI's Batch API through the official openai SDK: files of purpose batch, batches create, retrieve, list and
cancel, the output and error files; and the claim order that puts batch requests after interactive jobs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared import job_states
from shared.db import make_engine
from shared.job_data import GenerationOutput, GenerationParams, GenerationResult, Usage
from shared.models import Batch, File, Job, utcnow
from tests.process_settings import configure
from tests.systems import System

BASE = "test-base-model"


def batch_file(lines: list[object]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def completion_line(custom_id: str, prompt: str, model: str) -> dict[str, object]:
    body = {"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def finished(client: openai.OpenAI, batch_id: str, seconds: float = 60) -> openai.types.Batch:
    deadline = time.monotonic() + seconds
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, object]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.mark.e2e
def test_a_batch_answers_each_good_line_once_and_reports_bad_lines_with_their_line_numbers(
    production_system: System,
) -> None:
    client = openai.OpenAI(
        base_url=f"{production_system.base_url}/v1", api_key="unused", _strict_response_validation=True
    )
    model = production_system.env["LLMQ_BASE_MODEL"]
    content = batch_file(
        [
            completion_line("a", "Hello", model),
            b"{not json",
            completion_line("b", "The sky is", model),
            completion_line("a", "Duplicate", model),
            completion_line("c", "Once upon", model) | {"url": "/v1/embeddings"},
        ]
    )
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    assert uploaded.purpose == "batch"
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h", metadata={"run": "t"}
    )
    assert created.id.startswith("batch_") and created.object == "batch" and created.metadata == {"run": "t"}
    assert created.status in ("in_progress", "finalizing", "completed")

    batch = finished(client, created.id)
    assert batch.status == "completed" and batch.completed_at is not None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 2, 3)
    answers = jsonl(client, batch.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == ["a", "b"]  # type: ignore[type-var]
    for answer in answers:
        response = answer["response"]
        assert isinstance(response, dict) and response["status_code"] == 200
        assert response["body"]["object"] == "text_completion" and response["body"]["choices"][0]["text"]
    errors = jsonl(client, batch.error_file_id)
    assert [(e["error"]["line"], e["error"]["code"]) for e in errors] == [  # type: ignore[index]
        (2, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
    ]
    assert created.id in [b.id for b in client.batches.list(limit=100)]


@pytest.fixture
def sdk(
    postgres_url: str, quiet_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[openai.OpenAI]:
    """The SDK on the gateway in process, on real Postgres and Redis, with no worker (jobs stay queued) and no
    reaper loop (tests run its passes). A tenant may have 2 interactive jobs queued or running."""
    configure(
        monkeypatch,
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model=BASE,
        data_dir=str(tmp_path),
        max_active_jobs_per_tenant="2",
        gateway_runs_reaper="false",  # the tests run its passes themselves
    )
    from gateway.app import create_app
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as session:
        session.execute(delete(Batch))
        session.execute(delete(Job))
        session.commit()
    with TestClient(create_app()) as test_client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=test_client, max_retries=0)


def test_cancel_of_a_queued_batch_cancels_its_requests_and_lists_them_in_the_error_file(sdk: openai.OpenAI) -> None:
    chat = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat} for i in range(3)]
    uploaded = sdk.files.create(file=("chat.jsonl", batch_file(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts is not None and batch.request_counts.total == 3

    cancelled = sdk.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None and cancelled.output_file_id is None
    errors = jsonl(sdk, cancelled.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [  # type: ignore[index]
        (f"r{i}", "batch_cancelled") for i in range(3)
    ]
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(batch.id)


def test_a_batch_larger_than_the_quota_runs_and_leaves_the_quota_to_interactive_requests(sdk: openai.OpenAI) -> None:
    lines = [completion_line(f"r{i}", "Hi", BASE) for i in range(4)]
    uploaded = sdk.files.create(file=("big.jsonl", batch_file(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.request_counts is not None and batch.request_counts.total == 4
    submit = {"prompt": "hi", "max_tokens": 2}
    answers = [sdk.post("/generations", body=submit, cast_to=httpx.Response).status_code for _ in range(2)]
    assert answers == [202, 202]
    with pytest.raises(openai.RateLimitError):
        sdk.post("/generations", body=submit, cast_to=httpx.Response)


def test_another_tenants_batch_is_not_found(sdk: openai.OpenAI) -> None:
    from shared.db import get_sessionmaker

    now = utcnow()
    with get_sessionmaker()() as session:
        session.add(
            Batch(
                id="batch_other",
                tenant="someone-else",
                endpoint="/v1/completions",
                input_file_id="file-x",
                completion_window="24h",
                status="in_progress",
                total=1,
                line_errors={"data": []},
                completed=0,
                failed=0,
                created_at=now,
                expires_at=now,
            )
        )
        session.commit()
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_other")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.cancel("batch_other")
    assert [b.id for b in sdk.batches.list()] == []


def test_a_batch_of_a_fine_tuning_file_or_of_no_file_is_refused(sdk: openai.OpenAI) -> None:
    training = sdk.files.create(file=("d.jsonl", b'{"instruction": "a", "output": "b"}\n'), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="not batch") as refused:
        sdk.batches.create(input_file_id=training.id, endpoint="/v1/completions", completion_window="24h")
    assert refused.value.param == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-missing", endpoint="/v1/completions", completion_window="24h")


def test_bad_lines_name_their_custom_id_once_read_and_each_custom_id_is_answered_once(sdk: openai.OpenAI) -> None:
    good = completion_line("a", "Hi", BASE)
    lines = [
        good | {"url": "/v1/chat/completions"},  # refused after its custom_id was read: it names "a"
        good,  # "a" again: refused, naming no custom_id, so that "a" has one answer
        good | {"custom_id": "m", "method": "GET"},
        good | {"custom_id": "b", "body": None},
        good | {"custom_id": "t", "body": {"model": BASE, "prompt": [1, 2, 3]}},  # token ids
        good | {"custom_id": "e", "body": {"model": BASE, "prompt": []}},  # no prompt: it would never end
    ]
    uploaded = sdk.files.create(file=("requests.jsonl", batch_file(lines)), purpose="batch")
    created = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")

    batch = finished(sdk, created.id)

    assert batch.request_counts is not None and (batch.request_counts.completed, batch.request_counts.failed) == (0, 6)
    errors = {e["error"]["line"]: e for e in jsonl(sdk, batch.error_file_id)}  # type: ignore[index]
    named = {line: (e["custom_id"], e["error"]["code"]) for line, e in errors.items()}  # type: ignore[index]
    assert named == {1: ("a", "invalid_url"), 2: (None, "duplicate_custom_id"), 3: ("m", "invalid_method"),
                     4: ("b", "invalid_request"), 5: ("t", "invalid_body"), 6: ("e", "invalid_body")}  # fmt: skip
    assert errors[5]["error"]["message"].startswith("body.prompt: ")  # type: ignore[index]
    assert "function-after" not in errors[5]["error"]["message"]  # type: ignore[index]
    assert errors[6]["error"]["message"] == "body.prompt: must hold at least one prompt"  # type: ignore[index]


def test_files_list_takes_openais_purpose_limit_order_and_after(sdk: openai.OpenAI) -> None:
    for earlier in sdk.files.list():  # other tests' files (the fixture empties batches and jobs only)
        sdk.files.delete(earlier.id)
    training = b'{"instruction": "a", "output": "b"}\n'
    made = [sdk.files.create(file=(f"t{i}.jsonl", training), purpose="fine-tune").id for i in range(2)]
    made += [sdk.files.create(file=(f"b{i}.jsonl", batch_file([completion_line("x", "Hi", BASE)])),
                              purpose="batch").id for i in range(3)]  # fmt: skip

    def listed(**query: object) -> list[str]:
        return [f.id for f in sdk.files.list(**query)]  # type: ignore[arg-type]  # the SDK pages through after=

    assert listed(purpose="batch") == made[:1:-1]  # newest first, the batch files only
    assert listed(purpose="fine-tune", order="asc") == made[:2]
    page = sdk.files.list(purpose="batch", limit=2)
    assert [f.id for f in page.data] == made[:1:-1][:2] and page.has_more
    assert listed(purpose="batch", limit=1) == made[:1:-1]  # one file a page, every page
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.list(purpose="embeddings")  # type: ignore[arg-type]
    assert refused.value.param == "purpose"


def test_a_file_named_beyond_ascii_downloads_under_its_own_name(sdk: openai.OpenAI) -> None:
    name = "données_日本.jsonl"
    uploaded = sdk.files.create(file=(name, b'{"instruction": "a", "output": "b"}\n'), purpose="fine-tune")
    disposition = sdk.files.with_raw_response.content(uploaded.id).headers["content-disposition"]
    assert 'filename="donn_es___.jsonl"' in disposition  # what a header's plain form can carry
    assert "filename*=UTF-8''donn%C3%A9es_%E6%97%A5%E6%9C%AC.jsonl" in disposition


def run_requests(settings_sessions: sessionmaker[Session], count: int) -> list[str]:
    """Claims up to count queued generation jobs as a worker would and answers each (the real state machine)."""
    with settings_sessions() as session:
        claims = job_states.claim_batch(
            session, kind="generate", base_model=BASE, worker="test", lease_seconds=30, limit=count
        )
        output = GenerationOutput(index=0, text=" done", finish_reason="length", prompt_tokens=1, completion_tokens=1)
        usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        for claim in claims:
            assert job_states.succeed(session, claim, GenerationResult(outputs=[output], usage=usage))
    return [claim.job_id for claim in claims]


def submit(sdk: openai.OpenAI, count: int) -> openai.types.Batch:
    lines = [completion_line(f"r{i}", "Hi", BASE) for i in range(count)]
    uploaded = sdk.files.create(file=("requests.jsonl", batch_file(lines)), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")


def test_the_reaper_pass_finalizes_a_finished_batch_nobody_reads(sdk: openai.OpenAI) -> None:
    from gateway.app import _reap
    from shared.db import get_sessionmaker

    batch = submit(sdk, 2)
    run_requests(get_sessionmaker(), 2)
    _reap()
    with get_sessionmaker()() as session:
        row = session.get(Batch, batch.id)
        assert row is not None and row.status == "completed" and row.output_file_id is not None
        assert (row.completed, row.failed) == (2, 0) and row.completed_at is not None
    read = sdk.batches.retrieve(batch.id)
    assert read.status == "completed" and read.output_file_id == row.output_file_id
    assert sorted(a["custom_id"] for a in jsonl(sdk, read.output_file_id)) == ["r0", "r1"]  # type: ignore[type-var]


def test_finalizers_racing_on_one_batch_write_one_output_file(sdk: openai.OpenAI) -> None:
    from gateway import batches
    from shared.db import get_sessionmaker
    from shared.settings import get_settings

    batch = submit(sdk, 3)
    run_requests(get_sessionmaker(), 3)
    racers = 4
    start, wins = threading.Barrier(racers), []

    def finalize() -> None:
        with get_sessionmaker()() as session:
            start.wait()
            wins.append(batches.finalize(session, get_settings(), batch.id))

    threads = [threading.Thread(target=finalize) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(wins) == [False] * (racers - 1) + [True]
    with get_sessionmaker()() as session:
        outputs = session.scalars(select(File.id).where(File.filename == f"{batch.id}_output.jsonl")).all()
    assert outputs == [sdk.batches.retrieve(batch.id).output_file_id]


def test_a_batch_past_its_window_expires_keeping_finished_answers_and_listing_the_rest_as_expired(
    sdk: openai.OpenAI,
) -> None:
    from gateway.app import _reap
    from shared.db import get_sessionmaker

    batch = submit(sdk, 3)
    (answered,) = run_requests(get_sessionmaker(), 1)
    assert sdk.batches.retrieve(batch.id).status == "in_progress"
    with get_sessionmaker()() as session:  # the 24h window ends now
        row = session.get(Batch, batch.id)
        assert row is not None
        row.created_at -= timedelta(hours=24, seconds=1)
        row.expires_at -= timedelta(hours=24, seconds=1)
        session.commit()
    _reap()

    expired = sdk.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at is not None and expired.request_counts is not None
    counts = expired.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 1, 2)
    assert [a["response"]["request_id"] for a in jsonl(sdk, expired.output_file_id)] == [answered]  # type: ignore[index]
    errors = jsonl(sdk, expired.error_file_id)
    assert sorted((e["custom_id"], e["error"]["code"]) for e in errors) == [  # type: ignore[index]
        ("r1", "batch_expired"),
        ("r2", "batch_expired"),
    ]
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(batch.id)


def test_a_batch_whose_requests_all_ran_before_its_window_ended_completes(sdk: openai.OpenAI) -> None:
    from gateway.app import _reap
    from shared.db import get_sessionmaker

    batch = submit(sdk, 1)
    run_requests(get_sessionmaker(), 1)
    with get_sessionmaker()() as session:
        row = session.get(Batch, batch.id)
        assert row is not None
        row.expires_at -= timedelta(hours=25)
        session.commit()
    _reap()
    assert sdk.batches.retrieve(batch.id).status == "completed"


@pytest.fixture
def sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(postgres_url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session:
        session.execute(delete(Job))
        session.commit()
    yield factory
    engine.dispose()


def test_claims_take_interactive_jobs_before_older_batch_requests(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        queued = dict(model="m", base_model="m", params=GenerationParams(prompts=["p"]), max_attempts=3, tenant="t")
        older = job_states.create_batch_request(session, batch_id="batch_x", custom_id="c", line=1, **queued)  # type: ignore[arg-type]
        session.commit()
        newer = job_states.create_job(session, kind="generate", **queued)  # type: ignore[arg-type]
        session.commit()
        first = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=30, limit=1)
        second = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=30, limit=1)
    assert [c.job_id for c in first + second] == [newer.id, older.id]


def test_an_interactive_job_queued_behind_a_batch_backlog_is_claimed_first(sessions: sessionmaker[Session]) -> None:
    queued = dict(model="m", base_model="m", params=GenerationParams(prompts=["p"]), max_attempts=3, tenant="t")
    with sessions() as session:
        for line in range(1, 41):
            job_states.create_batch_request(session, batch_id="batch_x", custom_id=f"c{line}", line=line, **queued)  # type: ignore[arg-type]
        session.commit()
        interactive = job_states.create_job(session, kind="generate", **queued)  # type: ignore[arg-type]
        session.commit()
        claims = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=30, limit=4)
    assert claims[0].job_id == interactive.id
    assert [c.job.custom_id for c in claims[1:]] == ["c1", "c2", "c3"]


def test_the_claim_reads_its_order_from_the_claim_index_without_sorting(sessions: sessionmaker[Session]) -> None:
    query = job_states.queued_in_claim_order("generate", "m").limit(8).with_for_update(skip_locked=True)
    with sessions() as session:
        # Whether an index can serve the order, not what the planner prefers on the test database's few rows: with
        # scans and sorts priced out, a Sort is left only when no index gives the claim's order.
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_sort = off"))
        sql = str(query.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
        plan = "\n".join(row[0] for row in session.execute(text(f"EXPLAIN {sql}")))
    assert "ix_jobs_claim" in plan and "Sort" not in plan, plan


@pytest.mark.e2e
def test_llmq_batch_follows_the_batch_to_its_end_and_writes_the_answers(
    production_system: System, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    model = production_system.env["LLMQ_BASE_MODEL"]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(batch_file([completion_line("x", "Hello", model), completion_line("y", "Bye", model)]))
    answers = tmp_path / "answers.jsonl"
    url = production_system.base_url
    result = CliRunner().invoke(app, ["--url", url, "batch", str(requests), "--output", str(answers)])
    assert result.exit_code == 0, result.output
    assert "completed: 2 completed, 0 failed" in result.stdout
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["x", "y"]
