"""GET /metrics: figures read from the database and the broker at scrape time, in the Prometheus format."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select

from shared.statuses import is_terminal
from tests.process_settings import configure
from tests.systems import System

BASE = "test-base-model"
ADAPTER = "ft:test-base-model:demo:ftjob-000000000000000000000001"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def client(postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    configure(monkeypatch, database_url=postgres_url, broker_url=quiet_redis_url, base_model=BASE)
    from gateway.app import create_app
    from shared.db import get_sessionmaker
    from shared.models import Job

    with get_sessionmaker()() as session:
        session.execute(delete(Job))
        session.commit()
    redis.Redis.from_url(quiet_redis_url).delete("generate", "train")
    with TestClient(create_app()) as test_client:
        yield test_client


def add_job(
    *,
    job_id: str,
    kind: str = "generate",
    status: str = "succeeded",
    model: str = BASE,
    created: float,
    wait: float | None = None,
    run: float | None = None,
    result: dict[str, Any] | None = None,
    worker: str = "host:1",
    now: datetime | None = None,
) -> None:
    """A job row as a worker would have left it: created `created` seconds before now, waited, ran."""
    from shared.db import get_sessionmaker
    from shared.models import Job, utcnow

    now = now or utcnow()
    created_at = now - timedelta(seconds=created)
    started_at = created_at + timedelta(seconds=wait) if wait is not None else None
    finished_at = started_at + timedelta(seconds=run) if started_at is not None and run is not None else None
    with get_sessionmaker()() as session:
        session.add(
            Job(
                id=job_id,
                kind=kind,
                status=status,
                model=model,
                base_model=BASE,
                params={"prompts": ["a prompt that must never reach the metrics"]},
                result=result,
                attempt=1 if started_at else 0,
                max_attempts=3,
                worker=worker if started_at else None,
                created_at=created_at,
                started_at=started_at,
                finished_at=finished_at,
            )
        )
        session.commit()


def generated(tokens: int, batch_size: int) -> dict[str, Any]:
    usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
    return {"outputs": [], "usage": usage, "batch_size": batch_size}


def add_metric_event(job_id: str, data: dict[str, Any]) -> None:
    from shared.db import get_sessionmaker
    from shared.models import JobEvent

    with get_sessionmaker()() as session:
        session.add(JobEvent(job_id=job_id, attempt=1, level="info", type="metrics", message="m", data=data))
        session.commit()


def test_metrics_count_jobs_per_kind_and_status_and_queue_depth_from_the_database(client: TestClient) -> None:
    add_job(job_id="gen-q1", status="queued", created=30)
    add_job(job_id="gen-q2", status="queued", created=1)
    add_job(job_id="gen-s1", created=10, wait=0.5, run=0.2, result=generated(4, 1))
    add_job(job_id="gen-f1", status="failed", created=10, wait=0.5, run=1.0)
    add_job(job_id="ftjob-r1", kind="train", status="running", created=100, wait=2)

    samples = scrape(client.get("/metrics").text)

    assert value(samples, "llmq_jobs", kind="generate", status="queued") == 2
    assert value(samples, "llmq_jobs", kind="generate", status="succeeded") == 1
    assert value(samples, "llmq_jobs", kind="generate", status="failed") == 1
    assert value(samples, "llmq_jobs", kind="generate", status="cancelled") == 0
    assert value(samples, "llmq_jobs", kind="train", status="running") == 1
    assert value(samples, "llmq_queue_depth", queue="generate") == 2
    assert value(samples, "llmq_queue_depth", queue="train") == 0
    assert 30 <= value(samples, "llmq_queue_oldest_seconds", queue="generate") < 60
    assert value(samples, "llmq_queue_oldest_seconds", queue="train") == 0
    assert value(samples, "llmq_metrics_source_up", source="database") == 1


def test_metrics_histograms_tokens_and_models_cover_only_recently_finished_jobs(client: TestClient) -> None:
    from shared.models import utcnow

    # One batch of two jobs (same worker, same start) and one job alone; one job finished two hours ago.
    now = utcnow()
    add_job(job_id="gen-a", created=20, wait=0.02, run=0.2, result=generated(10, 5), worker="w:1", now=now)
    add_job(job_id="gen-b", created=20, wait=0.02, run=0.2, result=generated(7, 5), worker="w:1", now=now)
    add_job(job_id="gen-c", model=ADAPTER, created=5, wait=0.3, run=3.0, result=generated(16, 1))
    add_job(job_id="gen-d", model=ADAPTER, status="failed", created=5, wait=0.3, run=0.01)
    add_job(job_id="gen-old", created=7300, wait=1, run=1, result=generated(1000, 1))

    samples = scrape(client.get("/metrics").text)

    assert value(samples, "llmq_metrics_window_jobs") == 4
    assert value(samples, "llmq_metrics_window_seconds") == pytest.approx(3600, abs=5)
    # Run times 0.2, 0.2, 3.0, 0.01
    run = {le: value(samples, "llmq_job_run_seconds_bucket", kind="generate", le=le) for le in ("0.1", "0.25", "5.0")}
    assert run == {"0.1": 1, "0.25": 3, "5.0": 4}
    assert value(samples, "llmq_job_run_seconds_bucket", kind="generate", le="+Inf") == 4
    assert value(samples, "llmq_job_run_seconds_gsum", kind="generate") == pytest.approx(3.41, abs=0.01)
    # Waits 0.02, 0.02, 0.3, 0.3
    assert value(samples, "llmq_job_queue_wait_seconds_bucket", kind="generate", le="0.025") == 2
    assert value(samples, "llmq_job_queue_wait_seconds_bucket", kind="generate", le="0.5") == 4
    # Batches: one of 5 outputs (two jobs), one of 1
    assert value(samples, "llmq_batch_size_bucket", le="1.0") == 1
    assert value(samples, "llmq_batch_size_bucket", le="4.0") == 1
    assert value(samples, "llmq_batch_size_bucket", le="8.0") == 2
    assert value(samples, "llmq_batch_size_gcount") == 2
    # Per model: tokens, requests by status, latency of the succeeded ones
    assert value(samples, "llmq_generated_tokens", model=BASE) == 17
    assert value(samples, "llmq_generated_tokens", model=ADAPTER) == 16
    assert value(samples, "llmq_model_requests", model=BASE, status="succeeded") == 2
    assert value(samples, "llmq_model_requests", model=ADAPTER, status="succeeded") == 1
    assert value(samples, "llmq_model_requests", model=ADAPTER, status="failed") == 1
    assert value(samples, "llmq_model_latency_seconds_gcount", model=ADAPTER) == 1
    assert value(samples, "llmq_model_latency_seconds_bucket", model=ADAPTER, le="2.5") == 0
    assert value(samples, "llmq_model_latency_seconds_bucket", model=ADAPTER, le="5.0") == 1


def test_metrics_window_is_cut_to_the_newest_metrics_window_jobs(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i, age in enumerate((600, 300, 100)):
        add_job(job_id=f"gen-{i}", created=age, wait=0, run=1, result=generated(1, 1))
    monkeypatch.setenv("LLMQ_METRICS_WINDOW_JOBS", "2")
    from shared.settings import get_settings

    get_settings.cache_clear()
    samples = scrape(client.get("/metrics").text)
    assert value(samples, "llmq_metrics_window_jobs") == 2
    # The two newest finished 99 and 299 seconds ago: the figures cover about 299 seconds.
    assert value(samples, "llmq_metrics_window_seconds") == pytest.approx(299, abs=5)
    assert value(samples, "llmq_generated_tokens", model=BASE) == 2


def test_metrics_report_progress_and_newest_validation_loss_of_running_fine_tunes(client: TestClient) -> None:
    progress = {"step": 40, "total_steps": 100, "train_loss": 1.25, "trained_tokens": 5120, "estimated_finish": None}
    add_job(job_id="ftjob-run", kind="train", status="running", created=60, wait=1, result=progress)
    add_metric_event("ftjob-run", {"step": 0, "base_val_loss": 3.0})
    add_metric_event("ftjob-run", {"step": 20, "val_loss": 2.0})
    add_metric_event("ftjob-run", {"step": 40, "val_loss": 1.5})
    add_metric_event("ftjob-run", {"step": 40, "total_steps": 100, "train_loss": 1.25})
    add_job(job_id="ftjob-done", kind="train", created=60, wait=1, run=30, result={"trained_tokens": 9})

    samples = scrape(client.get("/metrics").text)

    labels = {"job_id": "ftjob-run", "model": BASE}
    assert value(samples, "llmq_train_step", **labels) == 40
    assert value(samples, "llmq_train_total_steps", **labels) == 100
    assert value(samples, "llmq_train_loss", **labels) == 1.25
    assert value(samples, "llmq_train_trained_tokens", **labels) == 5120
    assert value(samples, "llmq_train_val_loss", **labels) == 1.5
    assert not any(name == "llmq_train_step" and ("job_id", "ftjob-done") in key for name, key in samples)


def test_metrics_count_messages_waiting_in_redis_for_every_priority(client: TestClient, quiet_redis_url: str) -> None:
    client.post("/v1/generations", json={"prompt": "Hi", "max_tokens": 1}).raise_for_status()
    broker = redis.Redis.from_url(quiet_redis_url)
    broker.lpush("generate\x06\x163", b"{}")  # kombu's list for priority 3
    try:
        samples = scrape(client.get("/metrics").text)
    finally:
        broker.delete("generate", "generate\x06\x163")
    assert value(samples, "llmq_broker_messages", queue="generate") == 2
    assert value(samples, "llmq_broker_messages", queue="train") == 0
    assert value(samples, "llmq_queue_depth", queue="generate") == 1
    assert value(samples, "llmq_metrics_source_up", source="broker") == 1


def test_metrics_count_messages_of_the_embedded_file_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMQ_BROKER_URL", raising=False)
    configure(monkeypatch, data_dir=str(tmp_path))
    from gateway.metrics import broker_messages

    folder = tmp_path / "broker" / "queue"
    folder.mkdir(parents=True)
    for name in ("1_a.generate.msg", "2_b.generate.msg", "3_c.train.msg", ".4_d.generate.msg.tmp"):
        (folder / name).write_text("{}")
    assert broker_messages() == {"generate": 2, "train": 1}


def test_metrics_never_show_prompts_or_outputs(client: TestClient) -> None:
    add_job(job_id="gen-secret", created=5, wait=0, run=1, result=generated(1, 1))
    assert "must never reach" not in client.get("/metrics").text


def test_metrics_require_the_metrics_token_when_one_is_set(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQ_METRICS_TOKEN", "s3cret")
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_metrics_speak_openmetrics_to_a_scraper_that_asks(client: TestClient) -> None:
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "# TYPE llmq_job_run_seconds gaugehistogram" in response.text
    plain = client.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain")


def test_metrics_answer_when_the_database_is_down(monkeypatch: pytest.MonkeyPatch, quiet_redis_url: str) -> None:
    configure(
        monkeypatch,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1",
        broker_url=quiet_redis_url,
        gateway_runs_reaper="false",
    )
    from gateway.app import create_app

    with TestClient(create_app()) as test_client:
        response = test_client.get("/metrics")
    assert response.status_code == 200
    samples = scrape(response.text)
    assert value(samples, "llmq_metrics_source_up", source="database") == 0
    assert value(samples, "llmq_metrics_source_up", source="broker") == 1
    assert ("llmq_jobs", frozenset({("kind", "generate"), ("status", "queued")})) not in samples


# --- against a running system ---------------------------------------------------------------------------


def wait_done(system: System, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{system.base_url}/v1/generations/{job_id}", params={"wait": 10}, timeout=20).json()
        if is_terminal(job["status"]):
            return dict(job)
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish")


@pytest.mark.e2e
def test_generate_worker_records_its_batch_size_and_metrics_see_the_work(
    production_system: System, postgres_url: str
) -> None:
    from shared.db import make_engine
    from shared.models import Job

    body = {"prompts": ["One", "Two", "Three"], "n": 2, "max_tokens": 3, "temperature": 0}
    job = httpx.post(f"{production_system.base_url}/v1/generations", json=body, timeout=10).json()
    done = wait_done(production_system, job["id"])
    assert done["status"] == "succeeded"

    with make_engine(postgres_url).connect() as connection:
        result = connection.execute(select(Job.result).where(Job.id == job["id"])).scalar_one()
    assert result["batch_size"] >= 6  # three prompts, two outputs each, maybe with neighbours

    samples = scrape(httpx.get(f"{production_system.base_url}/metrics", timeout=10).text)
    assert value(samples, "llmq_metrics_source_up", source="database") == 1
    assert value(samples, "llmq_metrics_source_up", source="broker") == 1
    assert value(samples, "llmq_generated_tokens", model=done["model"]) >= done["usage"]["completion_tokens"]
    assert value(samples, "llmq_batch_size_gcount") >= 1
    assert value(samples, "llmq_model_requests", model=done["model"], status="succeeded") >= 1
    assert value(samples, "process_resident_memory_bytes") > 0


def families(text: str) -> dict[str, Any]:
    """The families of a scrape by name, parsed by prometheus_client's own parser."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def answered(url: str, timeout: float = 180) -> httpx.Response:
    """GET url once it answers (connection refused until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=10)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.e2e
def test_live_counters_count_requests_jobs_tokens_and_time_to_first_token_and_only_go_up(
    production_system: System,
) -> None:
    base = production_system.base_url
    worker = f"http://127.0.0.1:{production_system.env['LLMQ_WORKER_METRICS_PORT']}/metrics"
    before_worker = scrape(answered(worker).text)  # the worker may still be starting (its port opens when ready)
    before_gateway = scrape(httpx.get(f"{base}/metrics", timeout=10).text)

    body = {"prompts": ["Counted"], "max_tokens": 4, "temperature": 0}
    job = httpx.post(f"{base}/v1/generations", json=body, timeout=10).json()
    done = wait_done(production_system, job["id"])
    assert done["status"] == "succeeded"
    httpx.get(f"{base}/v1/generations/gen-not-there", timeout=10)

    gateway_text = httpx.get(f"{base}/metrics", timeout=10).text
    gateway = families(gateway_text)
    assert gateway["llmq_http_requests"].type == "counter"
    assert gateway["llmq_http_request_duration_seconds"].type == "histogram"
    assert gateway["llmq_jobs_submitted"].type == "counter"
    after_gateway = scrape(gateway_text)

    def grew(after: Samples, before: Samples, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert grew(after_gateway, before_gateway, "llmq_jobs_submitted_total", kind="generate") == 1
    # The route template, never the id: ids would make a label value per job.
    assert grew(after_gateway, before_gateway, "llmq_http_requests_total",
                method="POST", route="/v1/generations", status="202") == 1  # fmt: skip
    assert grew(after_gateway, before_gateway, "llmq_http_requests_total",
                method="GET", route="/v1/generations/{job_id}", status="404") == 1  # fmt: skip
    assert not any("gen-" in dict(labels).get("route", "") for _, labels in after_gateway)
    # The database-only gauges stay.
    assert gateway["llmq_queue_depth"].type == "gauge"
    assert gateway["llmq_queue_oldest_seconds"].type == "gauge"

    worker_text = httpx.get(worker, timeout=10).text
    at_worker = families(worker_text)
    for name, kind in {
        "llmq_prompt_tokens": "counter",
        "llmq_generation_tokens": "counter",
        "llmq_time_to_first_token_seconds": "histogram",
        "llmq_time_per_output_token_seconds": "histogram",
        "llmq_batch_size": "histogram",
        "llmq_request_queue_time_seconds": "histogram",
        "llmq_jobs_finished": "counter",
        "llmq_adapter_cache_hits": "counter",
        "llmq_adapter_cache_evictions": "counter",
        "llmq_adapter_loads": "counter",
        "llmq_train_steps": "counter",
        "llmq_train_tokens": "counter",
    }.items():
        assert at_worker[name].type == kind, name
    after_worker = scrape(worker_text)
    model = done["model"]
    usage = done["usage"]
    assert grew(after_worker, before_worker, "llmq_generation_tokens_total", model=model) == usage["completion_tokens"]
    assert grew(after_worker, before_worker, "llmq_prompt_tokens_total", model=model) == usage["prompt_tokens"]
    assert grew(after_worker, before_worker, "llmq_time_to_first_token_seconds_count", model=model) == 1
    assert grew(after_worker, before_worker, "llmq_jobs_finished_total", kind="generate", status="succeeded") == 1
    assert grew(after_worker, before_worker, "llmq_request_queue_time_seconds_count", kind="generate") == 1


def test_several_gateway_processes_add_up_their_counters_in_multiprocess_mode(
    postgres_url: str, quiet_redis_url: str, tmp_path: Path
) -> None:
    import os

    from cli.processes import Children, gateway_command, wait_ready
    from tests.systems import free_port

    shared = tmp_path / "prometheus"
    shared.mkdir()
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    env = {**inherited, "LLMQ_DATABASE_URL": postgres_url, "LLMQ_BROKER_URL": quiet_redis_url,
           "LLMQ_DATA_DIR": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(shared)}  # fmt: skip
    children = Children(env=env, log_dir=tmp_path / "logs")
    children.start("gateway", gateway_command("127.0.0.1", port, workers=2))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, children)
        with httpx.Client() as http:  # new connections: uvicorn's processes share the socket
            for _ in range(40):
                http.get(f"{base}/healthz", headers={"connection": "close"}, timeout=10)
        samples = scrape(httpx.get(f"{base}/metrics", timeout=10).text)
    finally:
        children.stop_all()
    # Whichever process answered the scrape, it counts the requests every process answered.
    assert value(samples, "llmq_http_requests_total", method="GET", route="/healthz", status="200") == 40
