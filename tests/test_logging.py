"""Structured logs: one JSON object per line, carrying the job id(s) a line belongs to."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.logging import JsonFormatter, TextFormatter, configure_logging, current_job_ids, job_context
from tests.systems import System

JOB = "gen-0123456789abcdef01234567"


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.getLogger("llmq.test").makeRecord("llmq.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_line_has_time_level_logger_message_and_no_job_outside_a_job() -> None:
    line = json.loads(JsonFormatter().format(record("hello %s", "world")))
    assert line.keys() == {"time", "level", "logger", "message"}
    assert line["level"] == "INFO" and line["logger"] == "llmq.test" and line["message"] == "hello world"
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_json_line_carries_the_job_id_of_its_context_and_job_ids_of_a_batch() -> None:
    with job_context(JOB):
        assert json.loads(JsonFormatter().format(record()))["job_id"] == JOB
        with job_context("gen-a", "gen-b"):
            assert json.loads(JsonFormatter().format(record()))["job_ids"] == ["gen-a", "gen-b"]
        assert current_job_ids() == (JOB,)
    assert current_job_ids() == ()


def test_json_line_keeps_extra_fields_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    failed.job_ids = ["gen-a"]
    line = json.loads(JsonFormatter().format(failed))
    assert line["job_ids"] == ["gen-a"]
    assert "ValueError: boom" in line["exception"]


def test_text_line_tags_the_job() -> None:
    with job_context(JOB):
        assert TextFormatter().format(record("hi")).endswith(f"llmq.test: hi [job_id={JOB}]")


def test_configure_logging_installs_one_handler_and_leaves_a_hosts_handlers_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    try:
        configure_logging("json")
        configure_logging("json")  # idempotent
        assert len(root.handlers) == 1
        with job_context(JOB):
            logging.getLogger("uvicorn.error").warning("through the root logger")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a warning becomes a line", UserWarning, stacklevel=1)
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert {"level": "WARNING", "logger": "uvicorn.error", "job_id": JOB}.items() <= lines[0].items()
        assert lines[1]["logger"] == "py.warnings" and "a warning becomes a line" in lines[1]["message"]

        host = logging.StreamHandler()
        root.handlers = [host]
        configure_logging("text")
        assert root.handlers == [host]
    finally:
        logging.captureWarnings(False)


def test_gateway_requests_about_a_job_log_with_its_id() -> None:
    from gateway.log_context import JobLogContext

    app = FastAPI()
    app.add_middleware(JobLogContext)

    @app.get("/v1/generations/{job_id}")
    def seen(job_id: str) -> list[str]:
        return list(current_job_ids())

    @app.get("/v1/jobs")
    def none() -> list[str]:
        return list(current_job_ids())

    with TestClient(app) as client:
        assert client.get(f"/v1/generations/{JOB}").json() == [JOB]
        assert client.get("/v1/generations/not-a-job-id").json() == []
        assert client.get("/v1/jobs").json() == []


def test_train_task_lines_carry_its_job_id() -> None:
    from celery.signals import task_postrun, task_prerun

    from shared.celery_app import TASKS
    from worker import app as worker_app

    class Task:
        def __init__(self, name: str) -> None:
            self.name = name

    assert worker_app.app is not None
    task_prerun.send(sender=None, task_id="t1", task=Task(TASKS["train"]), args=("ftjob-1",), kwargs={})
    assert current_job_ids() == ("ftjob-1",)
    task_postrun.send(sender=None, task_id="t1", task=Task(TASKS["train"]), args=("ftjob-1",), kwargs={})
    assert current_job_ids() == ()
    # A generate task serves whichever jobs wait; its message's id names none of them in particular.
    task_prerun.send(sender=None, task_id="t2", task=Task(TASKS["generate"]), args=("gen-1",), kwargs={})
    assert current_job_ids() == ()
    task_postrun.send(sender=None, task_id="t2", task=Task(TASKS["generate"]), args=("gen-1",), kwargs={})


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.e2e
def test_worker_and_gateway_processes_log_json_lines_naming_the_jobs(production_system: System) -> None:
    logs = Path(production_system.env["LLMQ_DATA_DIR"]) / "logs"
    job = httpx.post(f"{production_system.base_url}/v1/generations", json={"prompt": "Log me", "max_tokens": 2}).json()
    httpx.get(f"{production_system.base_url}/v1/generations/{job['id']}", params={"wait": 30}, timeout=40)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = [line for line in json_lines(logs / "worker-generate.log") if job["id"] in line.get("job_ids", [])]
        if batch:
            break
        time.sleep(0.1)
    # The claim names its jobs, in either batching mode (worker.scheduler: continuous; worker.serving: static).
    assert batch and batch[0]["logger"] in ("worker.scheduler", "worker.serving") and batch[0]["level"] == "INFO"
    assert any(line["logger"] == "gateway.app" for line in json_lines(logs / "gateway.log"))


def test_bitsandbytes_kernels_warning_becomes_a_debug_note_and_other_records_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import worker  # noqa: F401  (installs the filter)
    from worker.library_logs import BNB_CPU_LOGGER, BNB_KERNELS_NOTE

    logger = logging.getLogger(BNB_CPU_LOGGER)
    message = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please `pip install kernels`"
    with caplog.at_level(logging.INFO):
        logger.warning(message, "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=BNB_CPU_LOGGER):
        logger.warning(message, "No module named 'kernels'")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", BNB_KERNELS_NOTE)]


def test_a_worker_process_starts_without_the_bitsandbytes_kernels_warning() -> None:
    code = "import logging; logging.basicConfig(); import worker; import bitsandbytes"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "kernels-community" not in done.stderr and "kernels" not in done.stderr.lower(), done.stderr
