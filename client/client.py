"""LlmqClient: one typed method per endpoint of the llmq gateway, over httpx, with retries and waits.

Every method returns the response model from shared.schemas (the same classes the gateway answers
with) and raises an exception from client.errors for an error answer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from client.errors import LlmqError, UnreachableError, WaitTimeout, error_from_response, retry_after_seconds
from client.retries import RetryPolicy
from client.sse import json_events
from shared.batch_schemas import BatchObject
from shared.chat_schemas import ChatCompletion
from shared.job_data import JobKind
from shared.schemas import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningCheckpointList,
    FineTuningEvent,
    FineTuningEventList,
    FineTuningExport,
    FineTuningExportList,
    FineTuningJob,
    FineTuningJobList,
    GenerationJob,
    JobList,
    JobSummary,
    ModelDeleted,
    ModelList,
    ModelObject,
    Readiness,
)
from shared.statuses import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
LONG_POLL_SECONDS = 30.0  # one ?wait= request of a generation wait (the gateway caps it at max_wait_seconds)
EVENTS_PAGE = 100

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


def default_url() -> str:
    """The gateway's address: $LLMQ_URL, else the local default."""
    return os.environ.get("LLMQ_URL") or DEFAULT_URL


def _id(value: str) -> str:
    """A job or file id as one path segment (never a path of its own)."""
    return quote(value, safe="")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class LlmqClient:
    """A client of one llmq gateway. Use it as a context manager, or call close()."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """base_url defaults to $LLMQ_URL; api_key to $LLMQ_API_KEY (sent as a Bearer token; "" sends none).

        timeout: seconds for one request (a waiting request gets its wait on top). retries: further
        attempts after a 429, a 503 or a failure to connect, `backoff` seconds doubling (with jitter), or
        what the server's Retry-After says. transport and sleep are for tests.
        """
        self.base_url = (base_url or default_url()).rstrip("/")
        key = os.environ.get("LLMQ_API_KEY") if api_key is None else api_key
        headers = {"user-agent": "llmq-client/0.1"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self.retry_policy = RetryPolicy(retries=retries, backoff=backoff)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Closes the connection pool."""
        self._http.close()

    def __enter__(self) -> LlmqClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        files: Callable[[], AbstractContextManager[Any]] | None = None,
        timeout: float | None = None,
        retry: bool = True,
        accept: Sequence[int] = (),
        stream: bool = False,
    ) -> httpx.Response:
        """The answer to one request, retried per the policy; raises an LlmqError for an error answer.

        files builds the multipart parts afresh for each attempt (an upload is re-read from its start).
        With stream=True the answer's body is not read; the caller closes the response.
        """
        attempt = 0
        while True:
            delay: float | None = None
            try:
                with files() if files is not None else nullcontext() as parts:
                    request = self._http.build_request(
                        method,
                        path,
                        params=params,
                        json=json,
                        data=data,
                        files=parts,
                        timeout=self.timeout if timeout is None else timeout,
                    )
                    response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retry and RetryPolicy.retryable_error(method, exc):
                    delay = self.retry_policy.delay(attempt)
                if delay is None:
                    raise self._unreachable(exc, timeout) from exc
                log.info("%s %s: %s; retrying in %.2f s", method, path, exc, delay)
            else:
                if response.is_success or response.status_code in accept:
                    return response
                if stream:
                    response.read()
                    response.close()
                if retry and RetryPolicy.retryable_status(response.status_code):
                    delay = self.retry_policy.delay(attempt, retry_after_seconds(response))
                if delay is None:
                    raise error_from_response(response)
                log.info("%s %s: HTTP %d; retrying in %.2f s", method, path, response.status_code, delay)
            self._sleep(delay)
            attempt += 1

    def _unreachable(self, exc: httpx.TransportError, timeout: float | None) -> UnreachableError:
        if isinstance(exc, httpx.TimeoutException):
            seconds = self.timeout if timeout is None else timeout
            return UnreachableError(f"no answer from {self.base_url} within {seconds:g} s")
        reason = str(exc) or type(exc).__name__
        return UnreachableError(f"cannot reach llmq at {self.base_url} ({reason})")

    def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return _parse(model, self._send(method, path, **kwargs))

    # -- health -----------------------------------------------------------------------------------------------

    def healthz(self) -> dict[str, str]:
        """{"status": "ok"} while the gateway process is alive."""
        body = self._send("GET", "/healthz").json()
        return {str(k): str(v) for k, v in body.items()}

    def readyz(self) -> Readiness:
        """Whether the database and the broker answer (a 503 is an answer here, not an error; no retries)."""
        return _parse(Readiness, self._send("GET", "/readyz", retry=False, accept=(503,)))

    # -- generations ------------------------------------------------------------------------------------------

    def create_generation(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        template: Literal["raw", "model"] | None = None,
    ) -> GenerationJob:
        """The queued job for one prompt (a str) or several (a sequence); unset fields take the server's defaults.

        template "model" sends each prompt as a user turn rendered with the model's chat template."""
        body = _params(
            template=template,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop if stop is None or isinstance(stop, str) else list(stop),
            seed=seed,
        )
        if isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body["prompts"] = list(prompt)
        return self._call(GenerationJob, "POST", "/v1/generations", json=body)

    def get_generation(self, job_id: str, *, wait: float = 0) -> GenerationJob:
        """The generation job; with wait > 0 the server answers as soon as it ends, or after wait seconds."""
        params = {"wait": wait} if wait > 0 else None
        return self._call(
            GenerationJob, "GET", f"/v1/generations/{_id(job_id)}", params=params, timeout=self.timeout + wait
        )

    def cancel_generation(self, job_id: str) -> GenerationJob:
        """The job after a cancel: cancelled if it was queued; a running batch finishes."""
        return self._call(GenerationJob, "POST", f"/v1/generations/{_id(job_id)}/cancel")

    def wait_generation(self, job_id: str, *, timeout: float | None = None) -> GenerationJob:
        """The generation job once it ended; WaitTimeout after timeout seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_SECONDS if deadline is None else min(LONG_POLL_SECONDS, deadline - time.monotonic())
            job = self.get_generation(job_id, wait=max(left, 0))
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{job_id} still {job.status} after {timeout:g} s")

    # -- jobs of every kind -----------------------------------------------------------------------------------

    def list_jobs(
        self,
        *,
        kind: JobKind | None = None,
        status: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        """Jobs newest first; `after` is the last id of the previous page."""
        params = _params(kind=kind, status=status, limit=limit, after=after)
        return self._call(JobList, "GET", "/v1/jobs", params=params)

    def get_job(self, job_id: str) -> JobSummary:
        """Any job's summary (its kind, status, timing and error)."""
        return self._call(JobSummary, "GET", f"/v1/jobs/{_id(job_id)}")

    def get_job_detail(self, job_id: str) -> GenerationJob | FineTuningJob | JobSummary:
        """The full view of a job: outputs of a generation, progress of a fine-tune; an export's summary (its full
        view, with its file, is get_export)."""
        summary = self.get_job(job_id)
        if summary.kind == "generate":
            return self.get_generation(job_id)
        if summary.kind == "train":
            return self.get_fine_tuning_job(job_id)
        return summary

    def cancel(self, job_id: str) -> GenerationJob | FineTuningJob:
        """Cancels a job of either kind; the job as it is afterwards."""
        if self.get_job(job_id).kind == "generate":
            return self.cancel_generation(job_id)
        return self.cancel_fine_tuning_job(job_id)

    def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 2.0
    ) -> GenerationJob | FineTuningJob:
        """A job of either kind once it ended; WaitTimeout after timeout seconds (None: no limit)."""
        if self.get_job(job_id).kind == "generate":
            return self.wait_generation(job_id, timeout=timeout)
        return self.wait_fine_tuning(job_id, timeout=timeout, poll_interval=poll_interval)

    # -- files ------------------------------------------------------------------------------------------------

    def upload_file(self, path: str | Path, *, purpose: str = "fine-tune") -> FileObject:
        """The stored file, once the server validated every Alpaca record (ValidationError names the bad one)."""
        path = Path(path)
        return self._call(FileObject, "POST", "/v1/files", data={"purpose": purpose}, files=lambda: _open_upload(path))

    def list_files(self) -> FileList:
        """Every uploaded file, newest first."""
        return self._call(FileList, "GET", "/v1/files")

    def get_file(self, file_id: str) -> FileObject:
        """One uploaded file's description."""
        return self._call(FileObject, "GET", f"/v1/files/{_id(file_id)}")

    def download_file(self, file_id: str, target: str | Path) -> Path:
        """Streams a file's content (an upload, or a fine-tune's result file) into target; the path written.

        A part written before an error is removed, so target exists only when the download completed."""
        target = Path(target)
        response = self._send("GET", f"/v1/files/{_id(file_id)}/content", stream=True)
        try:
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            response.close()
        return target

    def delete_file(self, file_id: str) -> FileDeleted:
        """Deletes an uploaded file."""
        return self._call(FileDeleted, "DELETE", f"/v1/files/{_id(file_id)}")

    # -- batches ----------------------------------------------------------------------------------------------

    def create_batch(
        self, input_file_id: str, *, endpoint: str = "/v1/completions", metadata: Mapping[str, str] | None = None
    ) -> BatchObject:
        """A batch of the requests in an uploaded file (purpose batch), queued below interactive jobs."""
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h"}
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._call(BatchObject, "POST", "/v1/batches", json=body)

    def get_batch(self, batch_id: str) -> BatchObject:
        """One batch with its request counts; its output and error files once it has ended."""
        return self._call(BatchObject, "GET", f"/v1/batches/{_id(batch_id)}")

    def cancel_batch(self, batch_id: str) -> BatchObject:
        """The batch after a cancel: its queued requests cancelled, running ones stopping."""
        return self._call(BatchObject, "POST", f"/v1/batches/{_id(batch_id)}/cancel")

    # -- fine-tuning ------------------------------------------------------------------------------------------

    def create_fine_tuning_job(
        self,
        *,
        model: str,
        training_file: str | None = None,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> FineTuningJob:
        """The queued fine-tuning job; hyperparameters go in method.supervised (the server validates them)."""
        body = _params(
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            suffix=suffix,
            seed=seed,
            dataset=dict(dataset) if dataset is not None else None,
            metadata=dict(metadata) if metadata is not None else None,
        )
        if hyperparameters:
            body["method"] = {"type": "supervised", "supervised": {"hyperparameters": dict(hyperparameters)}}
        return self._call(FineTuningJob, "POST", "/v1/fine_tuning/jobs", json=body)

    def list_fine_tuning_jobs(self, *, after: str | None = None, limit: int | None = None) -> FineTuningJobList:
        """Fine-tuning jobs, newest first."""
        return self._call(FineTuningJobList, "GET", "/v1/fine_tuning/jobs", params=_params(after=after, limit=limit))

    def get_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        """One fine-tuning job, with its progress while it runs."""
        return self._call(FineTuningJob, "GET", f"/v1/fine_tuning/jobs/{_id(job_id)}")

    def cancel_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        """The job after a cancel: cancelled if queued; a running one stops after its current step."""
        return self._call(FineTuningJob, "POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/cancel")

    def pause_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        """The job after a pause: paused if queued; a running one checkpoints after its current step and pauses."""
        return self._call(FineTuningJob, "POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/pause")

    def resume_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        """The paused job queued again; a train worker continues it from its checkpoint."""
        return self._call(FineTuningJob, "POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/resume")

    def list_fine_tuning_events(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> FineTuningEventList:
        """A page of the job's events, newest first; `after` is the last id of the previous page."""
        params = _params(after=after, limit=limit)
        return self._call(FineTuningEventList, "GET", f"/v1/fine_tuning/jobs/{_id(job_id)}/events", params=params)

    def list_fine_tuning_checkpoints(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> FineTuningCheckpointList:
        """A page of the job's checkpoints, newest first."""
        params = _params(after=after, limit=limit)
        path = f"/v1/fine_tuning/jobs/{_id(job_id)}/checkpoints"
        return self._call(FineTuningCheckpointList, "GET", path, params=params)

    def export_fine_tuning_job(
        self, job_id: str, *, dtype: str | None = None, checkpoint: str | None = None
    ) -> FineTuningExport:
        """The queued export of the job's model (or of one of its checkpoints) merged into its unquantized base."""
        body = _params(dtype=dtype, checkpoint=checkpoint)
        return self._call(FineTuningExport, "POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/export", json=body)

    def get_export(self, job_id: str, export_id: str) -> FineTuningExport:
        """One export of a fine-tune: its status, and its file id once it succeeded."""
        return self._call(FineTuningExport, "GET", f"/v1/fine_tuning/jobs/{_id(job_id)}/exports/{_id(export_id)}")

    def list_exports(self, job_id: str, *, after: str | None = None, limit: int | None = None) -> FineTuningExportList:
        """A page of the job's exports, newest first."""
        params = _params(after=after, limit=limit)
        return self._call(FineTuningExportList, "GET", f"/v1/fine_tuning/jobs/{_id(job_id)}/exports", params=params)

    def wait_export(
        self, job_id: str, export_id: str, *, timeout: float | None = None, poll_interval: float = 2.0
    ) -> FineTuningExport:
        """The export once it ended, polled every poll_interval seconds; WaitTimeout after timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            export = self.get_export(job_id, export_id)
            if export.status in TERMINAL:
                return export
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise WaitTimeout(f"{export_id} still {export.status} after {timeout:g} s")
            self._sleep(poll_interval)

    def wait_fine_tuning(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 2.0
    ) -> FineTuningJob:
        """The fine-tuning job once it ended, polled every poll_interval seconds; WaitTimeout after timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get_job(job_id).status  # the light summary while polling; the full view once
            if status in TERMINAL:
                return self.get_fine_tuning_job(job_id)
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise WaitTimeout(f"{job_id} still {status} after {timeout:g} s")
            self._sleep(poll_interval)

    def follow_events(
        self, job_id: str, *, poll_interval: float = 2.0, history: bool = True
    ) -> Iterator[FineTuningEvent]:
        """The job's events oldest first, then new ones as they are written, until the job has ended.

        history=False skips the events written before the call. Polls every poll_interval seconds.
        """
        seen: set[str] = set()
        if not history:
            seen.update(e.id for e in self.list_fine_tuning_events(job_id, limit=1).data)
        while True:
            # Status first: once it reads terminal, every event of the job is already written.
            status = self.get_job(job_id).status
            for event in self._unseen_events(job_id, seen):
                seen.add(event.id)
                yield event
            if status in TERMINAL:
                return
            self._sleep(poll_interval)

    def _unseen_events(self, job_id: str, seen: set[str]) -> list[FineTuningEvent]:
        """Events newer than the newest seen one, oldest first (pages back until it meets a seen one)."""
        fresh: list[FineTuningEvent] = []
        after: str | None = None
        while True:
            page = self.list_fine_tuning_events(job_id, after=after, limit=EVENTS_PAGE)
            for event in page.data:
                if event.id in seen:
                    return fresh[::-1]
                fresh.append(event)
            if not page.has_more or not page.data:
                return fresh[::-1]
            after = page.data[-1].id

    # -- models -----------------------------------------------------------------------------------------------

    def list_models(self) -> ModelList:
        """Every model a generation may name: the base model and the fine-tuned ones."""
        return self._call(ModelList, "GET", "/v1/models")

    def get_model(self, model_id: str) -> ModelObject:
        """One model (ids may hold slashes and colons: hub ids, local paths, ft:... ids)."""
        return self._call(ModelObject, "GET", f"/v1/models/{quote(model_id, safe='/:@')}")

    def delete_model(self, model_id: str) -> ModelDeleted:
        """Deletes one of your fine-tuned models (no longer listed or served; its job's history stays)."""
        return self._call(ModelDeleted, "DELETE", f"/v1/models/{quote(model_id, safe='/:@')}")

    # -- completions ------------------------------------------------------------------------------------------
    # POST /v1/completions in the OpenAI shape. The gateway route is being added; until shared.schemas has
    # its response models these return plain dicts (then: Completion and CompletionChunk).

    def create_completion(self, *, model: str, prompt: str | Sequence[str], **params: Any) -> dict[str, Any]:
        """An OpenAI-shaped completion (max_tokens, temperature, top_p, stop, seed, ... as keywords)."""
        body = {"model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt), **params}
        body["stream"] = False
        return dict(self._send("POST", "/v1/completions", json=body).json())

    def stream_completion(self, *, model: str, prompt: str | Sequence[str], **params: Any) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed completion (`stream: true`, server-sent events) as they arrive."""
        body = {"model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt), **params}
        body["stream"] = True
        # Retries happen only before the first byte: a stream that broke halfway is not replayed.
        response = self._send("POST", "/v1/completions", json=body, stream=True)
        try:
            yield from json_events(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc, None) from exc
        finally:
            response.close()

    # -- chat completions ------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict[str, Any]], *, model: str, **params: Any) -> ChatCompletion:
        """An OpenAI chat completion of the conversation (max_tokens, temperature, n, stop, seed, logprobs, ... as
        keywords), rendered with the model's chat template by the server."""
        body = {"model": model, "messages": list(messages), **params, "stream": False}
        return self._call(ChatCompletion, "POST", "/v1/chat/completions", json=body)

    def stream_chat(self, messages: Sequence[dict[str, Any]], *, model: str, **params: Any) -> Iterator[dict[str, Any]]:
        """The chat.completion.chunk events of a streamed chat completion as they arrive (an error event as
        {"error": ...})."""
        body = {"model": model, "messages": list(messages), **params, "stream": True}
        response = self._send("POST", "/v1/chat/completions", json=body, stream=True)
        try:
            yield from json_events(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc, None) from exc
        finally:
            response.close()


@contextmanager
def _open_upload(path: Path) -> Iterator[dict[str, Any]]:
    """The multipart file part of an upload, the file open for as long as one attempt sends it."""
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise LlmqError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with stream:
        yield {"file": (path.name, stream)}


def _parse(model: type[M], response: httpx.Response) -> M:
    """The answer's body as the expected model; an LlmqError when it is not that shape."""
    try:
        return model.model_validate(response.json())
    except ValueError as exc:  # malformed JSON, or pydantic's ValidationError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LlmqError(
            f"unexpected answer from {response.request.method} {response.request.url.path}: {first}",
            status_code=response.status_code,
        ) from exc
