"""The generate worker's continuous loop: claims waiting jobs between decoding steps, lets their rows join the
running batch (worker.continuous), and writes each interactive job back, and tells its waiters, the moment its
last row ends; requests of OpenAI batches are written a few at a time (ContinuousLoop._end_finished).

One iteration of the loop:
  (at most every batch_poll_seconds) claim jobs while the batch has room, prepare them (adapters, prompts),
  prefill their rows into the batch, and drop the rows of jobs cancelled since the last look (while only batch
  requests are in flight, at most every BATCH_LAG_SECONDS)
  -> one decoding step -> stream deltas -> write back the jobs whose rows all ended -> the step hooks.
The loop ends when no job is in flight and none is waiting; the Celery message that started it is then done.

What holds for a static batch holds here. Each claim's lease is renewed from its claim to its write-back.
A job that ran before (its worker died with it) runs without neighbours: it is claimed only by an empty
batch, and nothing joins it. One job's failure stays its own: a job that cannot be prepared fails at once;
if the prefill of newcomers or a decoding step raises, the jobs it touched are decoded again from scratch by
serving.decode_isolating, which narrows the failure down to the jobs that cause it (every row keeps its seed,
so the others draw the same tokens, and text already streamed is not streamed again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from shared import job_states
from shared.db import get_sessionmaker
from shared.job_states import Claim, Outcome
from shared.models import Job
from shared.notify import publish_finished, publish_stream_end
from shared.settings import Settings
from worker.continuous import Row, RunningBatch, new_row
from worker.identity import worker_id
from worker.leases import lease_keeper
from worker.model_loading import LoadedModel
from worker.serving import (
    Decoded,
    ModelHolder,
    PreparedJob,
    _budget,
    _fault_injection,
    _params,
    _prompt_count,
    _prompts_of,
    _write_back,
    decode_isolating,
    outcome_of,
    prepare_jobs,
)
from worker.streaming import DeltaPublisher, StreamRow

log = logging.getLogger(__name__)


Pick = Callable[[Sequence[Job]], list[str]]  # which of the claim's candidates (in claim order) it takes


def _tokens(rows: Sequence[Row]) -> int:
    """Prompt and new tokens these rows may hold (what max_batch_tokens bounds)."""
    return sum(len(r.prompt_ids) + r.request.params.max_new_tokens for r in rows)


@dataclass(frozen=True)
class StepReport:
    """What one iteration of the loop did; what a step hook sees."""

    step: int  # iterations so far in this loop, from 1
    rows: int  # rows decoded together in this step
    in_flight: tuple[str, ...]  # jobs with rows still decoding after the step
    joined: tuple[str, ...]  # jobs whose rows joined (and got their first token) in this iteration
    finished: tuple[str, ...]  # jobs written back, or cancelled, in this iteration
    seconds: float  # wall time of the iteration


StepHook = Callable[[StepReport], None]

# Hooks every loop of this process calls after each iteration (metrics: batch size, time to first token).
step_hooks: list[StepHook] = []

# Set to drain: the loop stops claiming jobs, finishes the rows in flight and returns (warm shutdown).
stop_claiming = threading.Event()

# How far behind a batch request's bookkeeping may fall: while only requests of OpenAI batches are in flight, the loop
# looks for cancels (and claims taken over) at most this often (or every batch_poll_seconds, if that is longer);
# while an interactive job is in flight, finished batch requests wait at most this long to be written.
BATCH_LAG_SECONDS = 1.0


@dataclass
class InFlight:
    """A claimed job whose rows are in the running batch."""

    claim: Claim
    job: PreparedJob
    rows: list[Row]
    batch_size: int = 0  # most rows decoded together while it ran (its result reports it)
    joined: int = 0  # its place in the order in which jobs joined this loop's batch
    streams: dict[int, StreamRow] = field(default_factory=dict)  # output index -> where its text streams


def _is_batch(job: InFlight) -> bool:
    """Whether the job is a request of an OpenAI batch (priority below 0): it yields to interactive jobs."""
    return job.claim.job.priority < 0


def serve_continuously(settings: Settings, models: ModelHolder, hooks: Sequence[StepHook] | None = None) -> list[str]:
    """Serves waiting generation jobs until none is in flight or waiting; the ids of the jobs it ended."""
    return ContinuousLoop(settings, models, step_hooks if hooks is None else hooks).run()


class ContinuousLoop:
    """One run of the loop: its running batch, its jobs in flight and what it has streamed."""

    def __init__(self, settings: Settings, models: ModelHolder, hooks: Sequence[StepHook]) -> None:
        self.settings = settings
        self.models = models
        self.hooks = hooks
        self.keeper = lease_keeper(settings.lease_seconds)
        # Every claim this loop holds a lease for, in flight or not (one whose write-back failed has left
        # self.jobs): all are given back to their leases when the loop ends, however it ends.
        self.held: dict[str, Claim] = {}
        self.loaded: LoadedModel | None = None
        self.batch: RunningBatch | None = None
        self.jobs: dict[str, InFlight] = {}
        self.sent: dict[tuple[str, int], str] = {}  # text streamed so far, per (job, output)
        self.served: list[str] = []
        self.polled = -float("inf")  # when the loop last looked for waiting jobs and cancels (perf_counter)
        self.joins = 0  # jobs that joined so far (paused rows resume oldest first)
        self.backlog = False  # whether the last claim suggests jobs are waiting (it took some, or skipped batch ones)
        self.refill = False  # rows left while jobs were waiting: claim at the next iteration, not at the next look
        # Batch requests done but not yet written (their leases still held): written together, see _end_finished.
        self.unwritten: list[tuple[Claim, Outcome]] = []
        self.unwritten_since = 0.0  # when the oldest of them ended (perf_counter)
        self.cancels_looked = -float("inf")  # when the loop last looked for cancels (perf_counter)

    def run(self) -> list[str]:
        with get_sessionmaker()() as session:
            try:
                step = 0
                while True:
                    started = time.perf_counter()
                    # A database round trip per step costs more than a small model's step: with rows in flight,
                    # the loop looks for newcomers and cancels at most every batch_poll_seconds. Rows that end
                    # while jobs are waiting are refilled at once (one claim per wave of rows, not per step).
                    due = not self.jobs or started - self.polled >= self.settings.batch_poll_seconds
                    claimed, joined = self._claim_and_join(session) if due or self.refill else (False, [])
                    if not self.jobs and not claimed:
                        break
                    cancelled = self._cancel_requested(session) if due and self._cancels_due() else []
                    self.polled = started if due else self.polled
                    self._prioritize()
                    rows = self._step(session)
                    finished = cancelled + self._end_finished(session)
                    step += 1
                    self._after_step(StepReport(step, rows, tuple(self.jobs), tuple(joined), tuple(finished),
                                                time.perf_counter() - started))  # fmt: skip
            finally:
                self._write_unwritten(session)
                # Jobs still held (in flight, or their write-back failed: the database went away) are left to
                # their leases, which the reaper requeues once they expire. Renewed on, they would stay running.
                self._release(list(self.held.values()))
        return self.served

    def _write_unwritten(self, session: Session) -> None:
        """On the way out of a loop that raised, writes the batch requests' outcomes still waiting (a normal end
        has written them: the batch emptied), so that a failure elsewhere does not make them run again; if this
        write fails too (the database went away), their leases lapse like those of the jobs in flight."""
        if not self.unwritten:
            return
        outcomes, self.unwritten = self.unwritten, []
        try:
            session.rollback()
            self._write(session, outcomes)
        except Exception:
            log.exception("could not write %d finished batch requests on the way out; they will run again",
                          len(outcomes))  # fmt: skip

    def _after_step(self, report: StepReport) -> None:
        for hook in self.hooks:
            try:
                hook(report)
            except Exception:
                log.exception("a step hook failed; the loop goes on")

    # Joining: claim, prepare, prefill.

    def _claim_and_join(self, session: Session) -> tuple[bool, list[str]]:
        """Claims what fits the batch's room and lets it join; (whether it claimed any, the jobs that joined)."""
        self.refill = False
        claims = self._claim(session)
        if not claims:
            return False, []
        log.info(
            "claimed %d jobs: %s",
            len(claims),
            " ".join(f"{c.job_id}@{c.attempt}" for c in claims),
            extra={"job_ids": [c.job_id for c in claims]},
        )
        _fault_injection(claims)
        self._hold(claims)
        keep = [j.claim for j in self.jobs.values()]
        loaded, runnable, outcomes = prepare_jobs(session, claims, self.settings, self.models, keep)
        refused = [(c, o) for c, o in zip(claims, outcomes, strict=True) if o is not None]
        self._write(session, refused)
        if loaded is None or not runnable:
            return True, []
        self.loaded = loaded
        if self.batch is None or self.batch.loaded is not loaded:
            self.batch = RunningBatch(loaded)
        joining = [self._in_flight(claims[job.index], job) for job in runnable]
        self._make_room(sum(len(j.rows) for j in joining))
        try:
            self.batch.admit([row for j in joining for row in j.rows])
        except Exception as exc:
            log.warning("prefill of %d joining jobs failed (%s); decoding them apart", len(joining), exc)
            self._decode_apart(session, joining)
            return True, []
        self.jobs.update({j.claim.job_id: j for j in joining})
        for j in joining:
            j.joined, self.joins = self.joins, self.joins + 1
        self._stream()  # their first tokens, without waiting for the next step
        together = len(self.batch) + sum(r.done for j in joining for r in j.rows)
        for j in self.jobs.values():
            j.batch_size = max(j.batch_size, together)
        return True, [j.claim.job_id for j in joining]

    def _claim(self, session: Session) -> list[Claim]:
        if stop_claiming.is_set() or any(j.claim.attempt > 1 for j in self.jobs.values()):
            return []  # draining, or a job that ran before runs without neighbours
        s = self.settings
        rows = self.batch.rows if self.batch is not None else []
        # Batch rows give way to interactive jobs (_make_room pauses them), so an interactive job's room is what the
        # interactive rows leave; batch requests join beside every row decoding, into _batch_room.
        interactive = [row for row in rows if not self._is_batch_row(row)]
        room, tokens = s.max_batch_size - len(interactive), s.max_batch_tokens - _tokens(interactive)
        if room <= 0 or tokens <= 0:
            self.backlog = False
            return []
        beside = _budget(s, s.max_batch_size - len(rows), s.max_batch_tokens - _tokens(rows))
        # With no row left for batch requests, only interactive jobs are read (the claim index stops at the first
        # batch request): the look that runs every batch_poll_seconds costs one short query.
        interactive_only = bool(self.jobs) and self._batch_room() <= 0
        claims = job_states.claim_batch(
            session,
            kind="generate",
            base_model=s.base_model,
            worker=worker_id(),
            lease_seconds=s.lease_seconds,
            limit=room,
            pick=self._leaving_rows_free(_budget(s, room, tokens), beside),
            fresh_only=bool(self.jobs),
            min_priority=0 if interactive_only else None,
        )
        self.backlog = bool(claims) or interactive_only
        # Batch requests join batch_join_rows at a time: when a claim took that many, the next iteration claims again.
        joined = sum(len(_prompts_of(c.job)) for c in claims if c.job.priority < 0)
        self.refill = joined >= s.batch_join_rows
        return claims

    def _batch_room(self) -> int:
        """Rows that batch requests (priority below 0) may still take: max_batch_size less the rows they leave free
        for interactive jobs (batch_reserved_rows, at most a quarter of max_batch_size; an interactive job that
        needs more takes them from batch rows: _make_room) and the batch rows in flight; while an interactive job
        decodes, none while any batch row is in flight (paused ones too: a newcomer's prefill would hold up the
        interactive rows, only to wait behind them), else _cap()."""
        s = self.settings
        in_flight = sum(len(j.rows) for j in self.jobs.values() if _is_batch(j))
        interactive = sum(not r.done for j in self.jobs.values() if not _is_batch(j) for r in j.rows)
        if interactive:
            return 0 if in_flight else self._cap(interactive)
        return s.max_batch_size - min(s.batch_reserved_rows, s.max_batch_size // 4) - in_flight

    def _make_room(self, joining: int) -> None:
        """Pauses the youngest batch rows that these many joining rows would push past max_batch_size (only an
        interactive job's can: batch requests join into _batch_room), so that an interactive job joins at the next
        step even when batch requests fill every row. _prioritize resumes them once the interactive rows end."""
        assert self.batch is not None
        over = len(self.batch) + joining - self.settings.max_batch_size
        if over <= 0:
            return
        batch_rows = sorted((row for row in self.batch.rows if self._is_batch_row(row)), key=self._joined)
        youngest = {id(row) for row in batch_rows[-over:]}
        self.batch.pause(lambda row: id(row) in youngest)

    def _prioritize(self) -> None:
        """Before a step: while an interactive job decodes, at most _cap() batch rows decode
        beside it and the others pause (the youngest first; their KV cache kept); paused rows resume, oldest first,
        as those end, and all of them once no interactive job decodes."""
        batch = self.batch
        if batch is None:
            return
        interactive = sum(not self._is_batch_row(row) for row in batch.rows)
        if not interactive:
            batch.resume(lambda row: True)
            return
        cap = self._cap(interactive)
        decoding = [row for row in batch.rows if self._is_batch_row(row)]
        if len(decoding) > cap:
            keep = {id(row) for row in sorted(decoding, key=self._joined)[:cap]}
            batch.pause(lambda row: self._is_batch_row(row) and id(row) not in keep)
        elif len(decoding) < cap and batch.paused is not None:
            wake = {id(row) for row in sorted(batch.paused.rows, key=self._joined)[: cap - len(decoding)]}
            batch.resume(lambda row: id(row) in wake)

    def _cap(self, interactive: int) -> int:
        """Batch rows that decode beside these many interactive rows: batch_rows_beside_interactive when set, else
        as many as keep a step within interactive_slowdown of the interactive rows' own (worker.step_costs, as
        this process measured its steps), all when that is 0."""
        s = self.settings
        most = max(0, s.max_batch_size - interactive)  # an interactive job may bring more rows than a batch holds
        if s.batch_rows_beside_interactive:
            return min(s.batch_rows_beside_interactive, most)
        if not s.interactive_slowdown:
            return most
        return self.models.step_costs.rows_beside(interactive, s.interactive_slowdown, most)

    def _is_batch_row(self, row: Row) -> bool:
        return _is_batch(self.jobs[row.key[0]])  # type: ignore[index]

    def _joined(self, row: Row) -> int:
        return self.jobs[row.key[0]].joined  # type: ignore[index]

    def _leaving_rows_free(self, budget: Pick, beside: Pick) -> Pick:
        """The candidates minus the batch requests (priority below 0) that would take more rows than _batch_room
        or more than batch_join_rows rows at once (their prefill, one forward pass, would hold up every row: on a
        CPU a 28-row prefill of the full-size model takes seconds), and every batch request when an interactive
        job joins while batch rows are in flight (it would wait for their prefill, its own first token with it, as
        _batch_room has it wait while it decodes); then budget (the room interactive rows leave: batch rows give
        way) when an interactive job is among them, else beside (the room every row decoding leaves). A batch
        request always runs when no other one is in flight, so a batch never stalls."""
        in_flight = sum(len(j.rows) for j in self.jobs.values() if _is_batch(j))
        room = self._batch_room()

        join = self.settings.batch_join_rows

        def pick(candidates: Sequence[Job]) -> list[str]:
            allowed, taken, left, joining = [], in_flight > 0, room, 0
            interactive_joins = any(job.priority >= 0 for job in candidates)
            for job in candidates:
                if job.priority < 0:
                    rows = _prompt_count(job)
                    if taken and (interactive_joins or rows > left or joining + rows > join):
                        continue
                    taken, left, joining = True, left - rows, joining + rows
                allowed.append(job)
            return (budget if any(job.priority >= 0 for job in allowed) else beside)(allowed)

        return pick

    def _in_flight(self, claim: Claim, job: PreparedJob) -> InFlight:
        assert self.loaded is not None
        rows = [new_row(self.loaded, (job.job_id, k), r) for k, r in enumerate(job.requests)]
        streams = {k: s for k, s in enumerate(job.streams) if s is not None}
        return InFlight(claim, job, rows, streams=streams)

    # Decoding and streaming.

    def _step(self, session: Session) -> int:
        """One decoding step of every running row; how many rows it decoded."""
        batch = self.batch
        if batch is None or not len(batch):
            self._stream()
            return 0
        rows = len(batch)
        try:
            started = time.perf_counter()
            batch.step()
            self.models.step_costs.record(rows, time.perf_counter() - started)
        except Exception as exc:
            jobs = [j for j in self.jobs.values() if any(not r.done for r in j.rows)]
            log.warning("decoding step of %d jobs failed (%s); decoding them again apart", len(jobs), exc)
            batch.clear()
            for j in jobs:
                del self.jobs[j.claim.job_id]
            self._decode_apart(session, jobs)
        self._stream()
        return rows

    def _stream(self) -> None:
        """Publishes the new text of every streaming job in flight."""
        streaming = [j for j in self.jobs.values() if j.streams]
        if not streaming or self.loaded is None:
            return
        rows = [j.streams[k] for j in streaming for k in sorted(j.streams)]
        generated = [j.rows[k].generated for j in streaming for k in sorted(j.streams)]
        publisher = DeltaPublisher(self.loaded, rows, self.sent)
        publisher(generated)
        for row, now in zip(rows, publisher.rows, strict=True):
            if now is None:  # its publishing failed: the job stops streaming, its client gets the final result
                self.jobs[row.job_id].streams.pop(row.output_index, None)

    def _decode_apart(self, session: Session, jobs: Sequence[InFlight]) -> None:
        """Decodes these jobs from scratch, isolating whichever fails, and writes every outcome."""
        assert self.loaded is not None
        decoded = decode_isolating(self.loaded, [j.job for j in jobs], self.settings.max_batch_size, self.sent)
        self._write(session, [(j.claim, outcome_of(j.job, d)) for j, d in zip(jobs, decoded, strict=True)])

    # Leaving: done, cancelled.

    def _end_finished(self, session: Session) -> list[str]:
        """Writes back the jobs whose rows have all ended; the ids written.

        An interactive job is written at once (its client waits for it). A batch request's outcome waits to be
        written with others (see _batch_writes_due): a write is a transaction whatever its size, and with a small
        model writing the one or two requests that end at each step would cost more than the step."""
        if self.batch is None:
            return []
        ended = {row.key[0] for row in self.batch.take_finished()}  # type: ignore[index]
        done = [self.jobs.pop(i) for i in ended if i in self.jobs and all(r.done for r in self.jobs[i].rows)]
        urgent: list[tuple[Claim, Outcome]] = []
        if done:
            assert self.loaded is not None
            loaded = self.loaded
            decoded: list[Decoded] = [([r.generation(loaded) for r in j.rows], j.batch_size) for j in done]
            if not self.unwritten:
                self.unwritten_since = time.perf_counter()
            for j, d in zip(done, decoded, strict=True):
                (self.unwritten if _is_batch(j) else urgent).append((j.claim, outcome_of(j.job, d)))
            # Claim again at the next step, not at the next look, only what can join now: batch requests into the
            # rows that ended, or an interactive job after one (while one decodes, batch requests cannot join).
            self.refill = self.refill or (self.backlog and (bool(urgent) or self._batch_room() > 0))
        if not urgent and not (self.unwritten and self._batch_writes_due()):
            return []
        outcomes, self.unwritten = urgent + self.unwritten, []
        self._write(session, outcomes)
        return [claim.job_id for claim, _ in outcomes]

    def _batch_writes_due(self) -> bool:
        """Whether the batch requests' outcomes waiting are written now, with no interactive write to go with: once
        the batch empties; while an interactive job is in flight, only after BATCH_LAG_SECONDS (its own write, when
        it ends, takes them along: a write beside it would cost its next token that much); else once
        batch_join_rows of them wait, or batch_poll_seconds after the first ended."""
        waited = time.perf_counter() - self.unwritten_since
        if not self.jobs or stop_claiming.is_set():  # the batch emptied, or the worker drains: a kill may follow
            return True
        if self._interactive_in_flight():
            return waited >= BATCH_LAG_SECONDS
        return len(self.unwritten) >= self.settings.batch_join_rows or waited >= self.settings.batch_poll_seconds

    def _interactive_in_flight(self) -> bool:
        return any(not _is_batch(j) for j in self.jobs.values())

    def _cancels_due(self) -> bool:
        """Whether to look for cancels at this look: at every look while an interactive job is in flight (its
        client may cancel, or leave, at any step), at most every BATCH_LAG_SECONDS while only batch requests are
        (a batch's cancel may let its running requests finish; a look is a query on every job in flight). Timed
        from the looks themselves, not from the start of their iterations: a claim before a look (a model's first
        load, say) would otherwise bring two looks closer than that."""
        now = time.perf_counter()
        if not (self._interactive_in_flight() or now - self.cancels_looked >= BATCH_LAG_SECONDS):
            return False
        self.cancels_looked = now
        return True

    def _cancel_requested(self, session: Session) -> list[str]:
        """Drops the rows of jobs cancelled (or taken over) since the last step, before the next one; their ids."""
        gone = job_states.cancels_requested(session, [j.claim for j in self.jobs.values()])
        if not gone:
            return []
        if self.batch is not None:
            self.batch.remove(lambda row: row.key[0] in gone)
        leaving = [self.jobs.pop(i) for i in gone]
        for j in leaving:
            if job_states.finish_cancelled(session, j.claim):
                log.info("wrote %s@%d:cancelled", j.claim.job_id, j.claim.attempt)
            else:
                log.warning("%s@%d dropped: the claim is no longer current", j.claim.job_id, j.claim.attempt)
        self._notify([j.claim for j in leaving])
        return sorted(gone)

    def _write(self, session: Session, outcomes: Sequence[tuple[Claim, Outcome]]) -> None:
        """Writes these outcomes (one transaction) and tells the jobs' waiters."""
        if not outcomes:
            return
        claims = [c for c, _ in outcomes]
        _write_back(session, claims, [o for _, o in outcomes])
        self._notify(claims)

    def _hold(self, claims: Sequence[Claim]) -> None:
        self.keeper.hold(claims)
        self.held.update({c.job_id: c for c in claims})

    def _release(self, claims: Sequence[Claim]) -> None:
        self.keeper.release(claims)
        for c in claims:
            self.held.pop(c.job_id, None)

    def _notify(self, claims: Sequence[Claim]) -> None:
        self._release(claims)
        ids = [c.job_id for c in claims]
        publish_finished(ids)
        for claim in claims:
            params = _params(claim.job)
            if params is not None and params.stream:
                publish_stream_end(claim.job_id)
        self.served += ids
