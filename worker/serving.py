"""The generate side: claim waiting generation jobs, run them as one batch, write every output back."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared import job_states
from shared.artifacts import ArtifactStore
from shared.db import get_sessionmaker
from shared.job_data import ErrorCode, GenerationOutput, GenerationParams, GenerationResult, Usage
from shared.job_states import Claim, Outcome
from shared.logging import job_context
from shared.models import FineTunedModel, Job
from shared.notify import publish_finished, publish_stream_end
from shared.settings import Settings
from worker import metrics
from worker.adapter_cache import AdapterDiskCache, StoredAdapter
from worker.adapters import AdapterCache
from worker.chat_rendering import with_rendered_prompts
from worker.checkpoint_models import checkpoint_adapters
from worker.generation import Generation, PromptTooLong, Request, SamplingParams, check_fits, encode, generate
from worker.identity import worker_id
from worker.leases import lease_keeper
from worker.model_loading import LoadedModel, load_base_model, warn_if_4bit_is_slow_here
from worker.step_costs import StepCosts
from worker.streaming import DeltaPublisher, StreamRow

log = logging.getLogger(__name__)

# Fault injection for the chaos tests (tests/chaos): a worker that claims a job with a prompt exactly equal
# to this value SIGKILLs itself before generating, as a job that crashes its worker (a native-code fault,
# the kernel's OOM killer) would. Read once at import, from the environment only (deliberately not a
# setting); unset, as it always is in production, it costs one comparison per batch.
FAULT_KILL_ON_PROMPT = os.environ.get("LLMQ_FAULT_KILL_ON_PROMPT") or None
# Fault injection for tests (tests/test_batch_isolation.py): a worker preparing a job with a prompt exactly equal
# to this value raises as a tokenizer that cannot read a prompt would, so that one job's own error can be put
# into a real batch. Read once at import, from the environment only; unset in production.
FAULT_RAISE_ON_PROMPT = os.environ.get("LLMQ_FAULT_RAISE_ON_PROMPT") or None


class InjectedFault(RuntimeError):
    """The error LLMQ_FAULT_RAISE_ON_PROMPT raises."""


class ModelHolder:
    """The base model of this process and its adapters, loaded on first use (a failed load is retried)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._adapters: AdapterCache | None = None
        self.step_costs = StepCosts()  # what a decoding step of this model costs here, by its rows

    def get(self) -> LoadedModel:
        if self._loaded is None:
            s = self.settings
            self._loaded = load_base_model(s.base_model, s.base_model_revision, s.quantization, s.device)
            warn_if_4bit_is_slow_here(self._loaded)
            disk = AdapterDiskCache(ArtifactStore.from_settings(s), s.adapter_cache_dir, s.adapter_cache_bytes)
            self._adapters = AdapterCache(self._loaded, s.max_loaded_adapters, disk)
        return self._loaded

    def loaded_adapters(self) -> AdapterCache | None:
        """The adapters, once the model has loaded (None before: nothing loads for asking)."""
        return self._adapters

    @property
    def adapters(self) -> AdapterCache:
        self.get()
        assert self._adapters is not None
        return self._adapters


class ModelDeleted(Exception):
    """A job names a fine-tuned model its owner deleted (DELETE /v1/models/{id}) after the job was queued."""


class JobFailed(Exception):
    """A job cannot run: it fails alone with this error code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:2000]


def _failure(code: ErrorCode, exc: BaseException) -> tuple[ErrorCode, str]:
    return code, f"{type(exc).__name__}: {exc}"[:2000]


def _params(job: Job) -> GenerationParams | None:
    """The job's params, or None for a row whose params are not what the gateway writes (it fails alone when
    prepared)."""
    try:
        return GenerationParams.model_validate(job.params)
    except ValidationError:
        return None


def _requests(p: GenerationParams, adapter: str | None) -> list[Request]:
    """One request per output: each prompt n times, choice j seeded with seed + j.

    An unseeded choice gets a random seed here, once, so that a row decoded again (its batch failed and
    is re-run in parts) draws the same tokens it already streamed.
    """
    requests = []
    for prompt in p.prompts:
        for j in range(p.n):
            params = SamplingParams(
                max_new_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                stop=tuple(p.stop or ()),
                seed=secrets.randbits(63) if p.seed is None else p.seed + j,
                logprobs=p.logprobs,
            )
            requests.append(Request(prompt=prompt, params=params, adapter=adapter))
    return requests


def _result(generations: Sequence[Generation], batch_size: int) -> GenerationResult:
    """The job's result; batch_size: outputs decoded together (read by GET /metrics for its histogram)."""
    outputs = [
        GenerationOutput(
            index=i,
            text=g.text,
            finish_reason=g.finish_reason,
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            logprobs=g.logprobs,
        )
        for i, g in enumerate(generations)
    ]
    prompt_tokens = sum(g.prompt_tokens for g in generations)
    completion_tokens = sum(g.completion_tokens for g in generations)
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    return GenerationResult(outputs=outputs, usage=usage, batch_size=batch_size)


def _prompt_count(job: Job) -> int:
    """How many prompts a job holds (0 for a row whose params are not what the gateway writes)."""
    params = _params(job)
    return len(params.prompts) if params is not None else 0


def _budget(
    settings: Settings, prompts_left: int | None = None, tokens_left: int | None = None
) -> Callable[[Sequence[Job]], list[str]]:
    """Chooses the oldest jobs whose prompts fit max_batch_size and (roughly) max_batch_tokens, or what is
    left of them (a running batch's room)."""
    max_prompts = settings.max_batch_size if prompts_left is None else prompts_left
    max_tokens = settings.max_batch_tokens if tokens_left is None else tokens_left

    def cost(job: Job) -> int:
        # A rough token count (4 characters a token) is enough to bound a batch's memory. A row this cannot
        # price costs nothing here: it is claimed and then fails alone while being prepared, instead of
        # stopping every claim behind it.
        params = _params(job)
        if params is None:
            return 0
        return sum(len(p) // 4 + 1 for p in params.prompts) + len(params.prompts) * params.max_tokens

    def pick(candidates: Sequence[Job]) -> list[str]:
        chosen: list[str] = []
        prompts = tokens = 0
        for job in candidates:
            n, price = _prompt_count(job), cost(job)
            if chosen and (prompts + n > max_prompts or tokens + price > max_tokens):
                break
            chosen.append(job.id)
            prompts, tokens = prompts + n, tokens + price
        return chosen

    return pick


def serve_waiting_jobs(settings: Settings, models: ModelHolder) -> list[str]:
    """Claims waiting generation jobs, runs them and records every outcome; the job ids.

    settings.batching says how: continuous (worker.scheduler: jobs join and leave a running batch until
    none is waiting) or static (one claimed batch, run to its longest row).
    """
    if settings.batching == "continuous":
        from worker.scheduler import serve_continuously  # imported here: it builds on this module

        return serve_continuously(settings, models)
    return serve_static_batch(settings, models)


def serve_static_batch(settings: Settings, models: ModelHolder) -> list[str]:
    """Claims a batch of waiting generation jobs, runs it and records every outcome; the job ids."""
    session_factory = get_sessionmaker()
    with session_factory() as session:
        claims = job_states.claim_batch(
            session,
            kind="generate",
            base_model=settings.base_model,
            worker=worker_id(),
            lease_seconds=settings.lease_seconds,
            limit=settings.max_batch_size,
            pick=_budget(settings),
        )
        if not claims:
            return []
        # One line per claim and one per write-back: the audit trail the chaos tests read to prove that a
        # job, however often it ran, had its outcome written exactly once.
        log.info(
            "claimed %d jobs: %s",
            len(claims),
            " ".join(f"{c.job_id}@{c.attempt}" for c in claims),
            extra={"job_ids": [c.job_id for c in claims]},
        )
        _fault_injection(claims)
        started = time.perf_counter()
        with lease_keeper(settings.lease_seconds).holding(claims), job_context(*(c.job_id for c in claims)):
            outcomes = _run(session, claims, settings, models)
        _write_back(session, claims, outcomes)
    ids = [c.job_id for c in claims]
    publish_finished(ids)
    for claim in claims:
        params = _params(claim.job)
        if params is not None and params.stream:
            publish_stream_end(claim.job_id)
    prompts = sum(_prompt_count(c.job) for c in claims)
    elapsed = time.perf_counter() - started
    log.info("batch of %d jobs, %d prompts in %.3f s", len(claims), prompts, elapsed, extra={"job_ids": ids})
    return ids


# Errors after which whether a write landed is unknown (the database or the connection went away); any other
# error is about the values written, so it is worth writing the outcomes one by one.
OUTAGE = (OperationalError, InterfaceError)


def _write_back(session: Session, claims: Sequence[Claim], outcomes: Sequence[Outcome]) -> None:
    """Writes the batch's outcomes in one transaction and logs what was written, for the audit trail.

    If the commit fails because the database went away, whether it landed is unknown: the line says which
    outcomes were in flight, and the exception goes on (the jobs' leases lapse and the reaper requeues
    whatever did not land). If the database refuses a value instead (one job's result it cannot store), the
    outcomes are written one by one, and a job whose result is refused fails alone with result_not_storable.
    """
    pairs = list(zip(claims, outcomes, strict=True))
    metrics.jobs_decoded(pairs)
    try:
        written = job_states.finish_batch(session, pairs)
    except OUTAGE:
        log.exception("write-back failed, outcome unknown: %s", " ".join(_audit_token(c, o) for c, o in pairs))
        raise
    except Exception:
        session.rollback()
        log.exception("the database refused the batch's outcomes; writing them one by one")
        written = []
        for i, (claim, outcome) in enumerate(pairs):
            ok, pairs[i] = _write_one(session, claim, outcome)
            written.append(ok)
    for claim, ok in zip(claims, written, strict=True):
        if not ok:
            log.warning("outcome of %s@%d dropped: the claim is no longer current", claim.job_id, claim.attempt)
    landed = [_audit_token(c, o) for (c, o), ok in zip(pairs, written, strict=True) if ok]
    if landed:
        log.info("wrote %s", " ".join(landed))


def _audit_token(claim: Claim, outcome: Outcome) -> str:
    return f"{claim.job_id}@{claim.attempt}:{'failed' if outcome[1] else 'succeeded'}"


def _write_one(session: Session, claim: Claim, outcome: Outcome) -> tuple[bool, tuple[Claim, Outcome]]:
    """Writes one job's outcome; a refused result becomes the job's failure. (written, what was written)"""
    try:
        return job_states.finish_batch(session, [(claim, outcome)])[0], (claim, outcome)
    except OUTAGE:
        log.exception("write-back failed, outcome unknown: %s", _audit_token(claim, outcome))
        raise
    except Exception as exc:
        session.rollback()
        log.exception("the database refused the outcome of %s@%d", claim.job_id, claim.attempt)
        refused = f"the database refused the job's result: {exc}"[:2000]
        failed: Outcome = (None, (ErrorCode.RESULT_NOT_STORABLE, refused))
        return job_states.finish_batch(session, [(claim, failed)])[0], (claim, failed)


def _fault_injection(claims: Sequence[Claim]) -> None:
    """Kills this process at once (SIGKILL: no cleanup, no ack) if a claimed job carries the fault prompt."""
    if FAULT_KILL_ON_PROMPT is None:
        return
    for claim in claims:
        if FAULT_KILL_ON_PROMPT in _prompts_of(claim.job):
            log.warning("fault injection: %s@%d carries the kill prompt; SIGKILL", claim.job_id, claim.attempt)
            os.kill(os.getpid(), signal.SIGKILL)


def _prompts_of(job: Job) -> list[str]:
    params = _params(job)
    return params.prompts if params is not None else []


def _adapter_folders(
    session: Session, settings: Settings, claims: Sequence[Claim]
) -> tuple[dict[str, StoredAdapter | None], dict[str, Exception]]:
    """Where every fine-tuned model (or checkpoint) these jobs name is in the store (None where the model is
    unknown), and the models among them that their owner deleted (each with its ModelDeleted)."""
    wanted = {c.job.model for c in claims} - {settings.base_model}
    rows = session.scalars(select(FineTunedModel).where(FineTunedModel.id.in_(wanted))).all() if wanted else []
    folders: dict[str, StoredAdapter | None] = dict.fromkeys(wanted)
    deleted: dict[str, Exception] = {}
    for row in rows:
        if row.deleted_at is not None:
            deleted[row.id] = ModelDeleted(f"model {row.id!r} was deleted by its owner")
            continue
        files = row.manifest.get("files") if isinstance(row.manifest, dict) else None
        folders[row.id] = StoredAdapter(key=row.path, files=files)
    unknown = [m for m, folder in folders.items() if folder is None and m not in deleted]
    folders.update(checkpoint_adapters(session, ArtifactStore.from_settings(settings), unknown))
    return folders, deleted


@dataclass
class PreparedJob:
    """A job ready to decode: where its outcome goes, its requests, and where each row streams (None: nowhere)."""

    index: int
    job_id: str
    requests: list[Request]
    streams: list[StreamRow | None]


def _run(session: Session, claims: Sequence[Claim], settings: Settings, models: ModelHolder) -> list[Outcome]:
    """(result, None) or (None, (code, message)) for every claim, in order.

    Whatever goes wrong with one job (its row, its adapter, its prompt, its decoding, its result) fails that
    job alone, with its own code, and the rest of the batch runs in the same pass.
    """
    loaded, runnable, outcomes = prepare_jobs(session, claims, settings, models)
    if loaded is None:
        return [o for o in outcomes if o is not None]
    decoded = decode_isolating(loaded, runnable, settings.max_batch_size)
    for job, done in zip(runnable, decoded, strict=True):
        outcomes[job.index] = outcome_of(job, done)
    written = [o for o in outcomes if o is not None]
    assert len(written) == len(claims)  # every job was either refused while preparing or decoded
    return written


def prepare_jobs(
    session: Session, claims: Sequence[Claim], settings: Settings, models: ModelHolder, keep: Sequence[Claim] = ()
) -> tuple[LoadedModel | None, list[PreparedJob], list[Outcome | None]]:
    """(the model, the jobs ready to decode, the outcome of each claim that failed already: None elsewhere).

    The model is None when it cannot load (every claim then has its failure). keep: jobs already decoding,
    whose adapters must stay loaded.
    """
    try:
        loaded = models.get()
    except Exception as exc:
        log.exception("model load failed")
        message = f"could not load model {settings.base_model!r}: {type(exc).__name__}: {exc}"
        return None, [], [(None, (ErrorCode.MODEL_LOAD_FAILED, message[:2000]))] * len(claims)

    outcomes: list[Outcome | None] = [None] * len(claims)
    folders, deleted = _adapter_folders(session, settings, [*claims, *keep])
    session.commit()  # no transaction stays open while the batch generates (it would hold back vacuum)
    usable = {m: f for m, f in folders.items() if f is not None}
    names, broken = models.adapters.load_each(usable)  # a broken adapter fails its own jobs only
    broken.update(deleted)
    runnable: list[PreparedJob] = []
    for i, claim in enumerate(claims):
        try:
            runnable.append(_prepare(i, claim, loaded, settings, names, broken))
        except JobFailed as exc:
            outcomes[i] = (None, (exc.code, exc.message))
        except Exception as exc:
            log.exception("could not prepare %s", claim.job_id)
            outcomes[i] = (None, _failure(ErrorCode.PREPARATION_FAILED, exc))
    return loaded, runnable, outcomes


def outcome_of(job: PreparedJob, done: Decoded) -> Outcome:
    """The outcome to write for a decoded job: its result, or the error of its decoding or of its result."""
    if isinstance(done, str):
        return (None, (ErrorCode.GENERATION_FAILED, done))
    generations, batch_size = done
    try:
        result = _result(generations, batch_size)
        json.dumps(job_states.stored(result), allow_nan=False)  # what the database will be asked to store
        return (result, None)
    except Exception as exc:
        log.exception("could not serialize the result of %s", job.job_id)
        return (None, _failure(ErrorCode.RESULT_NOT_STORABLE, exc))


def _prepare(
    index: int,
    claim: Claim,
    loaded: LoadedModel,
    settings: Settings,
    names: dict[str, str],
    broken: dict[str, Exception],
) -> PreparedJob:
    """The job's requests, each tokenized and checked against the context; JobFailed (or any error) otherwise."""
    job = claim.job
    if job.model in broken:
        exc = broken[job.model]
        if isinstance(exc, ModelDeleted):
            raise JobFailed(ErrorCode.MODEL_DELETED, str(exc))
        message = f"could not load adapter {job.model!r}: {type(exc).__name__}: {exc}"
        raise JobFailed(ErrorCode.ADAPTER_LOAD_FAILED, message)
    if job.model != settings.base_model and job.model not in names:
        raise JobFailed(ErrorCode.MODEL_NOT_FOUND, f"no model {job.model!r}")
    params = with_rendered_prompts(
        GenerationParams.model_validate(job.params), loaded.tokenizer, settings.chat_template
    )
    requests = _requests(params, names.get(job.model))
    if not requests:  # the gateway refuses such a job; a row written otherwise would never end (nothing to decode)
        raise JobFailed(ErrorCode.PREPARATION_FAILED, "the job holds no prompts")
    for request in requests:
        if FAULT_RAISE_ON_PROMPT is not None and request.prompt == FAULT_RAISE_ON_PROMPT:
            raise InjectedFault(f"fault injection: the tokenizer refuses prompt {request.prompt!r}")
        try:
            check_fits(loaded, encode(loaded, request.prompt), request.params.max_new_tokens)
        except PromptTooLong as exc:
            raise JobFailed(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc)) from None
    streams = [StreamRow(claim.job_id, claim.attempt, k, r.params.stop) if params.stream else None
               for k, r in enumerate(requests)]  # fmt: skip
    return PreparedJob(index, claim.job_id, requests, streams)


# A job's generations and how many outputs were decoded together with them, or the error that failed it.
Decoded = tuple[list[Generation], int] | str


def decode_isolating(
    loaded: LoadedModel,
    jobs: Sequence[PreparedJob],
    max_batch_size: int,
    sent: dict[tuple[str, int], str] | None = None,
) -> list[Decoded]:
    """Each job's generations, decoding the jobs together; if that fails, the jobs are decoded again in halves
    until the failure is narrowed down to the jobs that cause it, which get their error instead.

    Every row keeps its seed, so a row decoded again draws the same tokens; what was already streamed is
    not streamed twice (the publisher remembers it across the re-runs, and sent carries what an earlier run,
    continuous or not, already published).
    """
    sent = {} if sent is None else sent

    def attempt(part: Sequence[PreparedJob]) -> list[Decoded]:
        if not part:
            return []
        flat = [request for job in part for request in job.requests]
        streams = [row for job in part for row in job.streams]
        error = None
        try:
            generations: list[Generation] = []
            for start in range(0, len(flat), max_batch_size):
                rows = streams[start : start + max_batch_size]
                listener = DeltaPublisher(loaded, rows, sent) if any(rows) else None
                generations += generate(loaded, flat[start : start + max_batch_size], on_step=listener)
        except Exception as exc:
            # Only the text is kept: the exception's frames hold the failed batch's tensors (its KV cache).
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if len(part) == 1:
                log.exception("decoding failed for %s", part[0].job_id)
        if error is not None:
            if len(part) == 1:
                return [error]
            log.warning("decoding %d jobs together failed (%s); decoding them in halves", len(part), error)
            half = len(part) // 2
            return attempt(part[:half]) + attempt(part[half:])
        out: list[Decoded] = []
        position = 0
        for job in part:
            out.append((generations[position : position + len(job.requests)], len(flat)))
            position += len(job.requests)
        return out

    return attempt(jobs)
