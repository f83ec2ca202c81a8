"""Rows every reader can read: generated NUL (and NaN figures) stored so GET, lists and /metrics read them,
migration 0006 repairing rows stored before (and making the JSON columns jsonb on Postgres), and a list or a
scrape that a row of the wrong shape cannot fail. Real Postgres and SQLite."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from shared.migrate import alembic_config
from tests.process_settings import configure
from tests.servers import TEST_DATABASE_URL

BASE = "test-base-model"


def database_up(scrape: str) -> float:
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == "llmq_metrics_source_up" and sample.labels == {"source": "database"}:
                return sample.value
    raise AssertionError("no llmq_metrics_source_up{source=database}")


@pytest.fixture
def client(postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    configure(monkeypatch, database_url=postgres_url, broker_url=quiet_redis_url, base_model=BASE)
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import Job

    with get_sessionmaker()() as session:
        session.execute(delete(Job))
        session.commit()
    with TestClient(create_app()) as test_client:
        yield test_client


# --- What the service writes on its own ---------------------------------------------------------------------


def test_generated_text_with_nul_is_stored_so_get_lists_and_metrics_read_it(client: TestClient) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import GenerationOutput, GenerationParams, GenerationResult, Usage

    with get_sessionmaker()() as session:
        job = job_states.create_job(
            session, kind="generate", model=BASE, base_model=BASE, params=GenerationParams(prompts=["hi"]),
            max_attempts=3,
        )  # fmt: skip
        session.commit()
        claim = job_states.claim(session, job.id, worker="w:1", lease_seconds=30)
        assert claim is not None
        output = GenerationOutput(index=0, text="a\x00b\ud800", finish_reason="length", prompt_tokens=1,
                                  completion_tokens=3)  # fmt: skip
        usage = Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4)
        result = GenerationResult(outputs=[output], usage=usage, batch_size=1)
        assert job_states.finish_batch(session, [(claim, (result, None))]) == [True]
    got = client.get(f"/v1/generations/{job.id}")
    assert got.status_code == 200 and got.json()["outputs"][0]["text"] == "a\ufffdb\ufffd"
    assert client.get("/v1/jobs").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and database_up(metrics.text) == 1.0
    assert 'llmq_generated_tokens{model="test-base-model"} 3.0' in metrics.text


def test_a_worker_message_quoting_a_nul_is_stored_as_an_event(client: TestClient) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import ErrorCode, FineTuneParams, FineTuneResult

    with get_sessionmaker()() as session:
        job = job_states.create_job(
            session, kind="train", model=BASE, base_model=BASE, params=FineTuneParams(hyperparameters={}),
            max_attempts=3, tenant="default",
        )  # fmt: skip
        session.commit()
        claim = job_states.claim(session, job.id, worker="w:1", lease_seconds=30)
        assert claim is not None
        # A diverged loss: JSON has no NaN, so it is stored (and shown) as null.
        diverged = FineTuneResult(step=1, total_steps=2, train_loss=float("nan"))
        assert job_states.record_progress(session, claim, diverged)
        progress = client.get("/metrics").text
        assert f'llmq_train_step{{job_id="{job.id}",model="{BASE}"}} 1.0' in progress
        assert job_states.add_event(session, claim, "tokenizer failed on 'a\x00b'", data={"val_loss": float("inf")})
        assert job_states.fail(session, claim, ErrorCode.TRAINING_FAILED, "bad text 'a\x00b'")
    events = client.get(f"/v1/fine_tuning/jobs/{job.id}/events").json()["data"]
    assert events[0]["message"] == "tokenizer failed on 'a\ufffdb'" and events[0]["data"] == {"val_loss": None}


def test_decoding_a_generated_nul_gives_the_replacement_character(tiny_model: Path) -> None:
    import torch

    from worker.generation import decode
    from worker.model_loading import LoadedModel, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model), "main")
    ids = tokenizer("a\x00b")["input_ids"]
    assert "\x00" in tokenizer.decode(ids)  # byte 0 is a token of the byte-level BPE: a model can generate it
    loaded = LoadedModel(name="tiny", model=None, tokenizer=tokenizer, device=torch.device("cpu"), quantization="fp32")
    assert decode(loaded, ids) == "a\ufffdb"


# --- Rows stored before: migration 0006 ---------------------------------------------------------------------


def _fresh_postgres() -> tuple[str, str]:
    name = f"llmq_test_m_{secrets.token_hex(4)}"
    admin = TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{TEST_DATABASE_URL.rpartition('/')[0]}/{name}", name


def _drop_postgres(name: str) -> None:
    admin = TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# What a 0005 database could hold, as Python's json.dumps wrote it (escapes, not the characters themselves).
BROKEN_PARAMS = (
    '{"training_file": "file-1", "validation_file": null, "dataset": null, "suffix": null, "seed": 1, '
    '"metadata": {"note": "a\\ud800b", "k\\u0000": "v"}, "hyperparameters": {"n_epochs": 3, "batch_size": 8, '
    '"learning_rate_multiplier": 1.0}}'
)
BROKEN_RESULT = (
    '{"outputs": [{"index": 0, "text": "x\\u0000y", "finish_reason": "length", "prompt_tokens": 1, '
    '"completion_tokens": 2}], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, '
    '"batch_size": 1}'
)
GOOD_RESULT = '{"text": "caf\\u00e9 \\ud83d\\ude00 back\\\\u0000slash"}'  # a real pair, an escaped backslash


def _insert_job(execute: Any, job_id: str, kind: str, params: str, result: str | None, cast: str) -> None:
    execute(
        "INSERT INTO jobs (id, tenant, kind, status, model, base_model, params, result, attempt, max_attempts, "
        f"cancel_requested, created_at, updated_at, finished_at) VALUES ('{job_id}', 'default', '{kind}', "
        f"'succeeded', '{BASE}', '{BASE}', {cast.format('p')}, {cast.format('r')}, 1, 3, false, "
        "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        {"p": params, "r": result},
    )


def test_migration_0006_repairs_unreadable_rows_and_makes_json_columns_jsonb_on_postgres(
    quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, name = _fresh_postgres()
    try:
        command.upgrade(alembic_config(url), "0005")
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as conn:

            def execute(sql: str, params: dict[str, Any]) -> None:
                conn.execute(sql.replace(":p", "%(p)s").replace(":r", "%(r)s"), params)

            _insert_job(execute, "ftjob-broken", "train", BROKEN_PARAMS, None, "CAST(:{} AS json)")
            _insert_job(execute, "gen-broken", "generate", '{"prompts": ["a"]}', BROKEN_RESULT, "CAST(:{} AS json)")
            _insert_job(execute, "gen-good", "generate", '{"prompts": ["b"]}', GOOD_RESULT, "CAST(:{} AS json)")
            with pytest.raises(psycopg.errors.UntranslatableCharacter):  # what broke /metrics before
                conn.execute("SELECT result #>> '{batch_size}' FROM jobs")

        command.upgrade(alembic_config(url), "head")

        with psycopg.connect(dsn, autocommit=True) as conn:
            types = conn.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public' "
                "AND column_name IN ('params', 'result', 'error', 'data', 'metrics', 'manifest')"
            ).fetchall()
            assert {t[2] for t in types} == {"jsonb"} and len(types) == 6
            rows = dict(conn.execute("SELECT id, result FROM jobs").fetchall())
            params = conn.execute("SELECT params FROM jobs WHERE id = 'ftjob-broken'").fetchone()
        assert params is not None and params[0]["metadata"] == {"note": "a\ufffdb", "k\ufffd": "v"}
        assert rows["gen-broken"]["outputs"][0]["text"] == "x\ufffdy"
        assert rows["gen-good"] == json.loads(GOOD_RESULT)  # left as it was

        configure(monkeypatch, database_url=url, broker_url=quiet_redis_url, base_model=BASE)
        from gateway.app import create_app

        with TestClient(create_app()) as client:
            listed = client.get("/v1/fine_tuning/jobs")
            assert listed.status_code == 200 and listed.json()["data"][0]["metadata"]["note"] == "a\ufffdb"
            assert client.get("/v1/generations/gen-broken").json()["outputs"] is not None
            metrics = client.get("/metrics")
            assert metrics.status_code == 200 and database_up(metrics.text) == 1.0
        command.downgrade(alembic_config(url), "0005")  # and back: jsonb to json
    finally:
        _drop_postgres(name)


def test_migration_0006_repairs_nan_surrogates_and_nul_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    command.upgrade(alembic_config(url), "0005")
    with sqlite3.connect(path) as conn:

        def execute(sql: str, params: dict[str, Any]) -> None:
            conn.execute(sql, params)

        _insert_job(execute, "gen-nan", "generate", '{"prompts": ["a\\ud800"]}', '{"loss": NaN}', ":{}")
        conn.execute(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, records, sha256, path, created_at) "
            "VALUES ('file-1', 'default', ?, 'fine-tune', 1, 1, 'x', 'files/file-1.jsonl', CURRENT_TIMESTAMP)",
            ("a\x00b.jsonl",),
        )
    command.upgrade(alembic_config(url), "head")
    with sqlite3.connect(path) as conn:
        params, result = conn.execute("SELECT params, result FROM jobs WHERE id = 'gen-nan'").fetchone()
        filename = conn.execute("SELECT filename FROM files").fetchone()[0]
    assert json.loads(params) == {"prompts": ["a\ufffd"]} and json.loads(result) == {"loss": None}
    assert filename == "a\ufffdb.jsonl"


# --- A row of the wrong shape -------------------------------------------------------------------------------


def test_one_row_of_the_wrong_shape_never_fails_a_list_or_the_metrics(client: TestClient) -> None:
    from shared.db import get_sessionmaker
    from shared.models import Job, JobEvent, utcnow

    now = utcnow()
    common = {"tenant": "default", "status": "succeeded", "model": BASE, "base_model": BASE, "attempt": 1,
              "max_attempts": 3, "created_at": now, "started_at": now, "finished_at": now}  # fmt: skip
    with get_sessionmaker()() as session:
        session.add(Job(id="ftjob-odd", kind="train", params={"suffix": None}, **common))  # no hyperparameters
        session.add(Job(id="ftjob-fine", kind="train", params=_train_params(), **common))
        odd_result = {"usage": {"completion_tokens": "many"}, "batch_size": [1], "outputs": "nope"}
        session.add(Job(id="gen-odd", kind="generate", params={"prompts": ["a"]}, result=odd_result, **common))
        running = common | {"status": "running", "finished_at": None}
        session.add(Job(id="ftjob-running", kind="train", params=_train_params(), result=["a", "list"], **running))
        session.flush()
        session.add(JobEvent(job_id="ftjob-running", attempt=1, level="info", type="metrics", message="m",
                             data={"val_loss": "low"}))  # fmt: skip
        session.commit()

    listed = client.get("/v1/fine_tuning/jobs")
    assert listed.status_code == 200
    assert [j["id"] for j in listed.json()["data"]] == ["ftjob-fine"]  # the two odd ones left out
    assert client.get("/v1/jobs").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and database_up(metrics.text) == 1.0
    assert 'llmq_jobs{kind="generate",status="succeeded"} 1.0' in metrics.text


def _train_params() -> dict[str, Any]:
    return {
        "training_file": "file-1",
        "validation_file": None,
        "dataset": None,
        "suffix": None,
        "seed": 1,
        "metadata": None,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
    }


# --- Rows written before a field existed --------------------------------------------------------------------


def test_rows_an_older_writer_left_read_with_the_defaults_of_the_fields_they_lack(client: TestClient) -> None:
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneResult, GenerationParams
    from shared.models import Job, utcnow

    now = utcnow()
    common = {"tenant": "default", "model": BASE, "base_model": BASE, "attempt": 1, "max_attempts": 3,
              "created_at": now, "started_at": now}  # fmt: skip
    # A generation stored before n, stop, seed and stream existed, and its result before batch_size did.
    old_generation = {"prompts": ["a"], "max_tokens": 4, "temperature": 0, "top_p": 1}
    old_result = {"outputs": [{"index": 0, "text": "b", "finish_reason": "length", "prompt_tokens": 1,
                               "completion_tokens": 1}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    # A fine-tune stored without seed and metadata, whose progress names its finish in unix seconds and has
    # neither trained_tokens nor train_loss.
    old_train = {"training_file": "file-1", "hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                "learning_rate_multiplier": 1.0}}  # fmt: skip
    old_progress = {"step": 3, "total_steps": 9, "estimated_finish": 4102444800}
    with get_sessionmaker()() as session:
        session.add(Job(id="gen-old", kind="generate", status="succeeded", params=old_generation, result=old_result,
                        finished_at=now, **common))  # fmt: skip
        session.add(Job(id="ftjob-old", kind="train", status="running", params=old_train, result=old_progress,
                        **common))  # fmt: skip
        session.commit()

    generation = client.get("/v1/generations/gen-old")
    assert generation.status_code == 200, generation.text
    assert generation.json()["request"] == old_generation and generation.json()["outputs"][0]["text"] == "b"
    # What the generate worker runs such a row with: the defaults of a request that left those fields out.
    params = GenerationParams.model_validate(old_generation)
    assert (params.n, params.stop, params.seed, params.stream) == (1, None, None, False)

    fine_tune = client.get("/v1/fine_tuning/jobs/ftjob-old")
    assert fine_tune.status_code == 200, fine_tune.text
    shown = fine_tune.json()
    assert shown["seed"] == 0 and shown["metadata"] is None and shown["validation_file"] is None
    assert shown["progress"] == {"step": 3, "total_steps": 9, "train_loss": None}
    assert shown["estimated_finish"] == 4102444800 and shown["trained_tokens"] is None
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == ["ftjob-old"]
    assert FineTuneResult.model_validate(old_progress).trained_tokens is None
