"""Files and fine-tuning jobs over REST, in process, against real Postgres and Redis (no worker)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete

from tests.process_settings import configure

BASE = "test-base-model"
SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"


@pytest.fixture
def client(
    postgres_url: str,
    quiet_redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    artifact_settings: dict[str, str],
) -> Iterator[TestClient]:
    """The gateway in process; its artifact store a folder under tmp_path or a prefix of an S3 bucket."""
    configure(
        monkeypatch,
        **{k.removeprefix("LLMQ_").lower(): v for k, v in artifact_settings.items()},
        database_url=postgres_url,
        broker_url=quiet_redis_url,
        base_model=BASE,
        data_dir=str(tmp_path),
        max_records="1000",
        max_field_chars="500",
        max_upload_bytes=str(2 * 2**20),
    )
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import File, Job

    with get_sessionmaker()() as session:
        session.execute(delete(Job))
        session.execute(delete(File))
        session.commit()
    with TestClient(create_app()) as test_client:
        yield test_client


def upload(client: TestClient, content: bytes, name: str = "data.jsonl") -> object:
    return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, content)})


def stored_files(tmp_path: Path) -> list[str]:
    """Keys of the uploaded files in the store; asserts that no upload left anything in the local scratch."""
    from shared.artifacts import ArtifactStore
    from shared.settings import get_settings

    scratch = get_settings().scratch_dir
    assert not scratch.exists() or list(scratch.iterdir()) == [], list(scratch.iterdir())
    return ArtifactStore.from_settings(get_settings()).glob("files/*")


def test_upload_of_jsonl_validates_and_describes_the_file(client: TestClient, tmp_path: Path) -> None:
    content = SAMPLE.read_bytes()
    response = upload(client, content)
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["id"].startswith("file-") and body["object"] == "file" and body["purpose"] == "fine-tune"
    assert body["bytes"] == len(content)
    assert body["records"] == len(content.splitlines())
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert client.get(f"/v1/files/{body['id']}").json() == body
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [body["id"]]
    assert len(stored_files(tmp_path)) == 1


def test_upload_of_a_json_array_is_accepted(client: TestClient) -> None:
    records = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]
    body = upload(client, json.dumps(records).encode(), "data.json").json()  # type: ignore[attr-defined]
    assert body["records"] == 2


@pytest.mark.parametrize(
    ("content", "where", "why"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "line 2", "missing required field 'output'"),
        (b'{"instruction": "a", "output": "b", "extra": 1}\n', "line 1", "unknown field 'extra'"),
        (b'{"instruction": "a", "output": 5}\n', "line 1", "field 'output' must be a string"),
        (b'{"instruction": "a", "output": "b"}\n{not json\n', "line 2", "invalid JSON"),
        (b'{"instruction": "a", "output": "\xff"}\n', "line 1", "not valid UTF-8"),
        (b'[{"instruction": "a", "output": "b"}, 3]', "record 1", "expected a JSON object"),
        (json.dumps({"instruction": "a" * 501, "output": "b"}).encode(), "line 1", "longer than 500 characters"),
        (b'{"instruction": "  ", "output": "b"}\n', "line 1", "field 'instruction' is empty"),
        (b"\n\n", "file", "no records"),
    ],
)
def test_bad_file_answers_400_naming_the_record_and_stores_nothing(
    client: TestClient, tmp_path: Path, content: bytes, where: str, why: str
) -> None:
    response = upload(client, content)
    assert response.status_code == 400  # type: ignore[attr-defined]
    detail = response.json()["detail"]  # type: ignore[attr-defined]
    assert f"{where}: " in detail and why in detail
    assert stored_files(tmp_path) == []
    assert client.get("/v1/files").json()["data"] == []


def test_too_many_records_answers_400_at_the_first_record_over(client: TestClient) -> None:
    content = b'{"instruction": "a", "output": "b"}\n' * 1001
    detail = upload(client, content).json()["detail"]  # type: ignore[attr-defined]
    assert "line 1001: more than 1000 records" in detail


def test_file_over_the_size_limit_answers_413(client: TestClient, tmp_path: Path) -> None:
    response = upload(client, b'{"instruction": "a", "output": "b"}\n' * 80_000)
    assert response.status_code == 413  # type: ignore[attr-defined]
    assert stored_files(tmp_path) == []


def test_file_content_streams_the_stored_records(client: TestClient) -> None:
    records = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]
    file_id = upload(client, json.dumps(records).encode(), "data.json").json()["id"]  # type: ignore[attr-defined]
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert 'filename="data.json"' in response.headers["content-disposition"]
    assert [json.loads(line) for line in response.content.splitlines()] == [{"input": "", **r} for r in records]
    assert client.get("/v1/files/file-nope/content").status_code == 404


@pytest.mark.parametrize(
    ("record", "stored"),
    [
        # Hugging Face's export of tatsu-lab/alpaca: the rendered `text` column is derived, so ignored.
        ({"instruction": "Add", "input": "1 2", "output": "3", "text": "Below is ... 3"},
         {"instruction": "Add", "input": "1 2", "output": "3"}),
        # OpenAI's legacy fine-tuning format, trained as given.
        ({"prompt": "Q: 1+2?\nA:", "completion": " 3"}, {"prompt": "Q: 1+2?\nA:", "completion": " 3"}),
    ],
)  # fmt: skip
def test_data_formats_users_already_have_are_accepted(
    client: TestClient, record: dict[str, str], stored: dict[str, str]
) -> None:
    response = upload(client, json.dumps(record).encode() + b"\n")
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    content = client.get(f"/v1/files/{response.json()['id']}/content").content  # type: ignore[attr-defined]
    assert json.loads(content) == stored


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"instruction": "a", "output": "b", "text": "t", "source": "x"}, "unknown field 'source'"),
        ({"prompt": "a", "completion": "b", "instruction": "c"}, "unknown field 'instruction'"),
        ({"prompt": "a"}, "missing required field 'completion'"),
        ({"prompt": "a", "completion": " "}, "field 'completion' is empty"),
    ],
)
def test_unknown_or_mixed_columns_are_still_refused(client: TestClient, record: dict[str, str], why: str) -> None:
    response = upload(client, json.dumps(record).encode() + b"\n")
    assert response.status_code == 400 and why in response.json()["detail"]  # type: ignore[attr-defined]


def test_delete_file_removes_it(client: TestClient, tmp_path: Path) -> None:
    file_id = upload(client, SAMPLE.read_bytes()).json()["id"]  # type: ignore[attr-defined]
    assert client.delete(f"/v1/files/{file_id}").json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}").status_code == 404
    assert stored_files(tmp_path) == []


def create_job(client: TestClient, **fields: object) -> object:
    return client.post("/v1/fine_tuning/jobs", json={"model": BASE, **fields})


def test_fine_tuning_job_is_queued_with_resolved_hyperparameters(client: TestClient) -> None:
    file_id = upload(client, SAMPLE.read_bytes()).json()["id"]  # type: ignore[attr-defined]
    hyper = {"n_epochs": 2, "learning_rate_multiplier": "auto", "lora_r": 8, "packing": True}
    response = create_job(
        client,
        training_file=file_id,
        suffix="demo",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    job = response.json()  # type: ignore[attr-defined]
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}
    resolved = job["method"]["supervised"]["hyperparameters"]
    assert resolved["lora_r"] == 8 and resolved["packing"] is True and resolved["learning_rate"] == 2e-4
    assert job["seed"] == 7 and job["user_provided_suffix"] == "demo" and job["metadata"] == {"team": "a"}
    assert job["training_file"] == file_id and job["dataset"] is None and job["fine_tuned_model"] is None
    fetched = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    # A read of a queued job adds where it stands in the queue (no train worker runs in this test).
    assert fetched.pop("queue") == {"position": 1, "live_workers": 0, "worker_alive": False}
    assert fetched == {k: v for k, v in job.items() if k != "queue"}
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["Created fine-tuning job"]


def test_running_fine_tune_shows_its_progress(client: TestClient) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneResult

    job = create_job(client).json()  # type: ignore[attr-defined]
    assert job["progress"] is None
    with get_sessionmaker()() as session:
        claim = job_states.claim(session, job["id"], worker="w", lease_seconds=60)
        assert claim is not None
        figures = FineTuneResult(trained_tokens=640, step=5, total_steps=20, train_loss=2.5, estimated_finish=None)
        assert job_states.record_progress(session, claim, figures)
        running = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert running["status"] == "running" and running["trained_tokens"] == 640
        assert running["progress"] == {"step": 5, "total_steps": 20, "train_loss": 2.5}
        assert job_states.succeed(session, claim, FineTuneResult(fine_tuned_model="ft:x", trained_tokens=2560))
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"] is None


def test_fine_tuning_without_a_file_uses_the_default_hub_dataset(client: TestClient) -> None:
    job = create_job(client).json()  # type: ignore[attr-defined]
    assert job["dataset"] == {"name": "tatsu-lab/alpaca", "split": "train", "sample_size": None}
    sampled = create_job(client, dataset={"name": "tatsu-lab/alpaca", "sample_size": 100}).json()  # type: ignore[attr-defined]
    assert sampled["dataset"]["sample_size"] == 100


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"training_file": "file-missing"}, ["body", "training_file"]),
        ({"validation_file": "file-missing"}, ["body", "validation_file"]),
        ({"model": "other-model"}, ["body", "model"]),
        ({"suffix": "has space"}, ["body", "suffix"]),
        ({"method": {"type": "dpo"}}, ["body", "method", "type"]),
        (
            {"method": {"supervised": {"hyperparameters": {"lora_r": 0}}}},
            ["body", "method", "supervised", "hyperparameters", "lora_r"],
        ),
        (
            {"method": {"supervised": {"hyperparameters": {"bogus": 1}}}},
            ["body", "method", "supervised", "hyperparameters", "bogus"],
        ),
        (
            {"method": {"supervised": {"hyperparameters": {"quantization": "fp8"}}}},
            ["body", "method", "supervised", "hyperparameters", "quantization"],
        ),
    ],
)
def test_invalid_fine_tuning_request_answers_400_naming_the_field(
    client: TestClient, fields: dict[str, object], loc: list[object]
) -> None:
    response = create_job(client, **fields)
    assert response.status_code == 400  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert error["type"] == "invalid_request_error" and error["param"] and error["code"]
    locs = [e["loc"] for e in response.json()["detail"]]  # type: ignore[attr-defined]
    assert any(found[: len(loc)] == loc for found in locs), locs
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_cancel_of_a_queued_fine_tune_ends_it_at_once(client: TestClient) -> None:
    job = create_job(client).json()  # type: ignore[attr-defined]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages == ["Cancellation requested", "Created fine-tuning job"]


def test_pause_and_resume_answer_409_outside_the_states_they_move_between(client: TestClient) -> None:
    job_id = create_job(client).json()["id"]  # type: ignore[attr-defined]
    path = f"/v1/fine_tuning/jobs/{job_id}"
    resumed = client.post(f"{path}/resume")  # queued, not paused
    assert resumed.status_code == 409 and resumed.json()["error"]["code"] == "invalid_job_state"
    assert "only a paused job can resume" in resumed.json()["detail"]
    assert client.post(f"{path}/pause").json()["status"] == "paused"  # a queued job pauses at once
    assert client.post(f"{path}/pause").status_code == 409
    assert client.post(f"{path}/resume").json()["status"] == "queued"
    assert client.post(f"{path}/pause").json()["status"] == "paused"
    assert client.post(f"{path}/cancel").json()["status"] == "cancelled"  # a paused job cancels at once
    paused = client.post(f"{path}/pause")  # finished
    assert paused.status_code == 409
    assert "is cancelled; only a queued or running job can pause" in paused.json()["detail"]
    messages = [e["message"] for e in client.get(f"{path}/events").json()["data"]]
    assert messages[:3] == ["Cancellation requested", "Pause requested", "Resume requested"]
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/pause").status_code == 404


def test_fine_tuning_list_pages_newest_first(client: TestClient) -> None:
    ids = [create_job(client).json()["id"] for _ in range(3)]  # type: ignore[attr-defined]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_unknown_fine_tuning_job_answers_404(client: TestClient) -> None:
    for path in ("", "/events", "/checkpoints"):
        assert client.get(f"/v1/fine_tuning/jobs/ftjob-nope{path}").status_code == 404
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404


def test_models_lists_the_base_model(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [BASE]
    assert client.get(f"/v1/models/{BASE}").json()["id"] == BASE
    assert client.get("/v1/models/ft:nope").status_code == 404
