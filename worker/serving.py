"""The generate side: claim waiting generation jobs, run them as one batch, write every output back."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import artifacts, job_states
from shared.db import get_sessionmaker
from shared.job_states import Claim, Outcome
from shared.logging import job_context
from shared.models import FineTunedModel, Job
from shared.notify import publish_finished, publish_stream_end
from shared.settings import Settings
from worker.adapters import AdapterCache
from worker.generation import Generation, PromptTooLong, Request, SamplingParams, check_fits, encode, generate
from worker.leases import lease_keeper
from worker.model_loading import LoadedModel, load_base_model
from worker.streaming import DeltaPublisher, StreamRow

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

# Fault injection for the chaos tests (tests/chaos): a worker that claims a job with a prompt exactly equal
# to this value SIGKILLs itself before generating, as a job that crashes its worker (a native-code fault,
# the kernel's OOM killer) would. Read once at import, from the environment only (deliberately not a
# setting); unset, as it always is in production, it costs one comparison per batch.
FAULT_KILL_ON_PROMPT = os.environ.get("LLMQ_FAULT_KILL_ON_PROMPT") or None


class ModelHolder:
    """The base model of this process and its adapters, loaded on first use (a failed load is retried)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._adapters: AdapterCache | None = None

    def get(self) -> LoadedModel:
        if self._loaded is None:
            s = self.settings
            self._loaded = load_base_model(s.base_model, s.base_model_revision, s.quantization, s.device)
            self._adapters = AdapterCache(self._loaded, s.max_loaded_adapters)
        return self._loaded

    @property
    def adapters(self) -> AdapterCache:
        self.get()
        assert self._adapters is not None
        return self._adapters


def _requests(job: Job, adapter: str | None) -> list[Request]:
    """One request per output: each prompt n times, choice j seeded with seed + j."""
    p = job.params
    n, seed = p.get("n", 1), p.get("seed")
    requests = []
    for prompt in p["prompts"]:
        for j in range(n):
            params = SamplingParams(
                max_new_tokens=p["max_tokens"],
                temperature=p["temperature"],
                top_p=p["top_p"],
                stop=tuple(p.get("stop") or ()),
                seed=None if seed is None else seed + j,
            )
            requests.append(Request(prompt=prompt, params=params, adapter=adapter))
    return requests


def _result(generations: Sequence[Generation]) -> dict[str, Any]:
    outputs = [
        {
            "index": i,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
        }
        for i, g in enumerate(generations)
    ]
    prompt_tokens = sum(g.prompt_tokens for g in generations)
    completion_tokens = sum(g.completion_tokens for g in generations)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {"outputs": outputs, "usage": usage}


def _budget(settings: Settings) -> Any:
    """Chooses the oldest jobs whose prompts fit max_batch_size and (roughly) max_batch_tokens."""

    def pick(candidates: Sequence[Job]) -> list[str]:
        chosen: list[str] = []
        prompts = tokens = 0
        for job in candidates:
            n = len(job.params["prompts"])
            # A rough token count (4 characters a token) is enough to bound a batch's memory.
            cost = sum(len(p) // 4 + 1 for p in job.params["prompts"]) + n * job.params["max_tokens"]
            if chosen and (prompts + n > settings.max_batch_size or tokens + cost > settings.max_batch_tokens):
                break
            chosen.append(job.id)
            prompts, tokens = prompts + n, tokens + cost
        return chosen

    return pick


def serve_waiting_jobs(settings: Settings, models: ModelHolder) -> list[str]:
    """Claims a batch of waiting generation jobs, runs it and records every outcome; the job ids."""
    session_factory = get_sessionmaker()
    with session_factory() as session:
        claims = job_states.claim_batch(
            session,
            kind="generate",
            base_model=settings.base_model,
            worker=WORKER_ID,
            lease_seconds=settings.lease_seconds,
            limit=settings.max_batch_size,
            pick=_budget(settings),
        )
        if not claims:
            return []
        # One line per claim and one per write-back: the audit trail the chaos tests read to prove that a
        # job, however often it ran, had its outcome written exactly once.
        log.info("claimed %d jobs: %s", len(claims), " ".join(f"{c.job_id}@{c.attempt}" for c in claims))
        _fault_injection(claims)
        started = time.perf_counter()
        with lease_keeper(settings.lease_seconds).holding(claims), job_context(*(c.job_id for c in claims)):
            outcomes = _run(session, claims, settings, models)
        _write_back(session, claims, outcomes)
    ids = [c.job_id for c in claims]
    publish_finished(ids)
    for claim in claims:
        if claim.job.params.get("stream"):
            publish_stream_end(claim.job_id)
    prompts = sum(len(c.job.params["prompts"]) for c in claims)
    elapsed = time.perf_counter() - started
    log.info("batch of %d jobs, %d prompts in %.3f s", len(claims), prompts, elapsed, extra={"job_ids": ids})
    return ids


def _write_back(session: Session, claims: Sequence[Claim], outcomes: Sequence[Outcome]) -> None:
    """Writes the batch's outcomes in one transaction and logs what was written, for the audit trail.

    If the commit fails (the database went away), whether it landed is unknown: the line says which
    outcomes were in flight, and the exception goes on (the jobs' leases lapse and the reaper requeues
    whatever did not land).
    """
    pairs = list(zip(claims, outcomes, strict=True))
    tokens = [f"{c.job_id}@{c.attempt}:{'failed' if error else 'succeeded'}" for c, (_, error) in pairs]
    try:
        written = job_states.finish_batch(session, pairs)
    except Exception:
        log.exception("write-back failed, outcome unknown: %s", " ".join(tokens))
        raise
    for claim, ok in zip(claims, written, strict=True):
        if not ok:
            log.warning("outcome of %s@%d dropped: the claim is no longer current", claim.job_id, claim.attempt)
    if any(written):
        log.info("wrote %s", " ".join(t for t, ok in zip(tokens, written, strict=True) if ok))


def _fault_injection(claims: Sequence[Claim]) -> None:
    """Kills this process at once (SIGKILL: no cleanup, no ack) if a claimed job carries the fault prompt."""
    if FAULT_KILL_ON_PROMPT is None:
        return
    for claim in claims:
        if FAULT_KILL_ON_PROMPT in claim.job.params["prompts"]:
            log.warning("fault injection: %s@%d carries the kill prompt; SIGKILL", claim.job_id, claim.attempt)
            os.kill(os.getpid(), signal.SIGKILL)


def _adapter_folders(session: Session, settings: Settings, claims: Sequence[Claim]) -> dict[str, Path | None]:
    """Adapter folder of every fine-tuned model these jobs name (None where the model is unknown)."""
    wanted = {c.job.model for c in claims} - {settings.base_model}
    rows = session.scalars(select(FineTunedModel).where(FineTunedModel.id.in_(wanted))).all() if wanted else []
    folders: dict[str, Path | None] = dict.fromkeys(wanted)
    for row in rows:
        folders[row.id] = artifacts.resolve(settings, row.path)
    return folders


def _run(session: Session, claims: Sequence[Claim], settings: Settings, models: ModelHolder) -> list[Outcome]:
    """(result, None) or (None, (code, message)) for every claim, in order."""
    try:
        loaded = models.get()
    except Exception as exc:
        log.exception("model load failed")
        message = f"could not load model {settings.base_model!r}: {type(exc).__name__}: {exc}"
        return [(None, ("model_load_failed", message[:2000]))] * len(claims)

    outcomes: list[Outcome | None] = [None] * len(claims)
    folders = _adapter_folders(session, settings, claims)
    session.commit()  # no transaction stays open while the batch generates (it would hold back vacuum)
    usable = {m: f for m, f in folders.items() if f is not None}
    broken: str | None = None
    try:
        names = models.adapters.ensure(usable)
    except Exception as exc:  # a broken adapter fails its jobs, not the base-model jobs beside them
        log.exception("adapter load failed")
        names, broken = {}, f"could not load adapter: {type(exc).__name__}: {exc}"[:2000]
    runnable: list[tuple[int, list[Request]]] = []
    for i, claim in enumerate(claims):
        job = claim.job
        if job.model != settings.base_model and job.model not in names:
            missing = ("model_not_found", f"no model {job.model!r}")
            outcomes[i] = (None, ("adapter_load_failed", broken) if broken and usable.get(job.model) else missing)
            continue
        requests = _requests(job, names.get(job.model))
        try:
            for request in requests:
                check_fits(loaded, encode(loaded, request.prompt), request.params.max_new_tokens)
        except PromptTooLong as exc:
            outcomes[i] = (None, ("context_length_exceeded", str(exc)))
            continue
        runnable.append((i, requests))

    flat = [request for _, requests in runnable for request in requests]
    stream_rows = [
        StreamRow(claims[i].job_id, claims[i].attempt, k, r.params.stop) if claims[i].job.params.get("stream") else None
        for i, requests in runnable
        for k, r in enumerate(requests)
    ]
    try:
        generations: list[Generation] = []
        for start in range(0, len(flat), settings.max_batch_size):
            end = start + settings.max_batch_size
            rows = stream_rows[start:end]
            listener = DeltaPublisher(loaded, rows) if any(rows) else None
            generations += generate(loaded, flat[start:end], on_step=listener)
    except Exception as exc:
        log.exception("generation failed")
        for i, _ in runnable:
            outcomes[i] = (None, ("generation_failed", f"{type(exc).__name__}: {exc}"[:2000]))
        return [o for o in outcomes if o is not None]

    position = 0
    for i, requests in runnable:
        # batch_size: outputs decoded together (read by GET /metrics for its batch-size histogram)
        outcomes[i] = (_result(generations[position : position + len(requests)]) | {"batch_size": len(flat)}, None)
        position += len(requests)
    return [o for o in outcomes if o is not None]
