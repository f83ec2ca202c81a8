"""The job state machine on a real Postgres (and SQLite): claims, guarded writes, cancel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, inspect, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import job_states
from shared.db import make_engine
from shared.job_data import ErrorCode, GenerationOutput, GenerationParams, GenerationResult, Usage
from shared.job_states import Claim
from shared.migrate import upgrade
from shared.models import Checkpoint, Job, JobEvent
from shared.statuses import JobStatus


@pytest.fixture(params=["postgres", "sqlite"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on an empty jobs table."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        upgrade(url)
    engine = make_engine(url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session:
        session.execute(delete(Job))
        session.commit()
    yield factory
    engine.dispose()


def add_jobs(factory: sessionmaker[Session], n: int, base_model: str = "m") -> list[str]:
    with factory() as session:
        jobs = [
            job_states.create_job(
                session,
                kind="generate",
                model=base_model,
                base_model=base_model,
                params=GenerationParams(prompts=[f"prompt {i}"]),
                max_attempts=3,
            )
            for i in range(n)
        ]
        session.commit()
        return [j.id for j in jobs]


def result(text: str) -> GenerationResult:
    output = GenerationOutput(index=0, text=text, finish_reason="length", prompt_tokens=1, completion_tokens=1)
    return GenerationResult(outputs=[output], usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))


def claim_all(factory: sessionmaker[Session], worker: str, out: list[str]) -> None:
    with factory() as session:
        while claims := job_states.claim_batch(
            session, kind="generate", base_model="m", worker=worker, lease_seconds=60, limit=3
        ):
            out.extend(c.job_id for c in claims)


def test_concurrent_claimers_never_share_a_job(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, 60)
    results: list[list[str]] = [[] for _ in range(6)]
    threads = [threading.Thread(target=claim_all, args=(sessions, f"w{i}", results[i])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job_id for r in results for job_id in r]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    with sessions() as session:
        jobs = session.query(Job).all()
        assert {j.status for j in jobs} == {JobStatus.RUNNING}
        assert {j.attempt for j in jobs} == {1}


def test_claim_takes_oldest_first_and_only_its_base_model(sessions: sessionmaker[Session]) -> None:
    other = add_jobs(sessions, 2, base_model="other")
    mine = add_jobs(sessions, 3)
    with sessions() as session:
        claims = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=60, limit=2)
        assert [c.job_id for c in claims] == mine[:2]
        assert session.get(Job, other[0]).status == JobStatus.QUEUED  # type: ignore[union-attr]


def test_pick_narrows_the_batch_but_always_takes_one(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, 3)
    with sessions() as session:
        claims = job_states.claim_batch(
            session, kind="generate", base_model="m", worker="w", lease_seconds=60, limit=3,
            pick=lambda jobs: [jobs[0].id],
        )  # fmt: skip
        assert [c.job_id for c in claims] == ids[:1]


def test_a_claims_job_is_its_row_as_claimed_and_detached_even_if_the_session_held_it_stale(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = add_jobs(sessions, 1)
    with sessions() as session:
        held = session.get(Job, job_id)  # the session holds the row as it was: queued, priority 0
        with sessions() as other:
            other.execute(update(Job).where(Job.id == job_id).values(priority=5))
            other.commit()

        (claim,) = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=60,
                                          limit=1)  # fmt: skip

        assert inspect(claim.job).detached and claim.job is held
        with sessions() as other:
            row = other.get(Job, job_id)
            assert row is not None
        job = claim.job
        assert (job.priority, job.status, job.attempt, claim.attempt, job.worker) == (5, JobStatus.RUNNING, 1, 1, "w")
        assert (job.lease_expires_at.replace(tzinfo=None), job.started_at.replace(tzinfo=None)) == (  # type: ignore[union-attr]
            row.lease_expires_at.replace(tzinfo=None), row.started_at.replace(tzinfo=None))  # type: ignore[union-attr]  # fmt: skip


def test_claim_of_a_job_that_is_no_longer_queued_does_nothing(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1)
    with sessions() as session:
        first = job_states.claim(session, job_id, worker="a", lease_seconds=60)
        second = job_states.claim(session, job_id, worker="b", lease_seconds=60)
        assert first is not None and second is None


def test_stale_attempt_cannot_finish_a_job_claimed_again(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1)
    with sessions() as session:
        stale = job_states.claim(session, job_id, worker="a", lease_seconds=60)
        assert stale is not None
        stale_attempt = Claim(job_id, stale.attempt, stale.job)
        # The lease expired and the job went back to the queue (what the reaper does).
        session.execute(Job.__table__.update().values(status=JobStatus.QUEUED))
        session.commit()
        fresh = job_states.claim(session, job_id, worker="b", lease_seconds=60)
        assert fresh is not None and fresh.attempt == 2
        assert not job_states.succeed(session, stale_attempt, result("stale"))
        assert not job_states.add_event(session, stale_attempt, "stale event")
        assert job_states.succeed(session, fresh, result("fresh"))
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None and job.status == JobStatus.SUCCEEDED
        assert GenerationResult.model_validate(job.result) == result("fresh")
        assert session.query(JobEvent).filter_by(job_id=job_id).count() == 0


def test_leases_renew_together_and_a_claim_taken_over_is_reported_lost(sessions: sessionmaker[Session]) -> None:
    kept_id, lost_id = add_jobs(sessions, 2)
    with sessions() as session:
        kept = job_states.claim(session, kept_id, worker="a", lease_seconds=1)
        lost = job_states.claim(session, lost_id, worker="a", lease_seconds=1)
        assert kept is not None and lost is not None
        session.execute(Job.__table__.update().where(Job.id == lost_id).values(attempt=Job.attempt + 1))
        session.commit()
        assert job_states.renew_leases(session, [kept, lost], 600) == {lost_id}
        row = session.get(Job, kept_id, populate_existing=True)
        assert row is not None and row.lease_expires_at is not None
        assert (row.lease_expires_at - row.updated_at).total_seconds() > 500


def test_a_new_checkpoint_drops_the_rows_of_rotated_out_ones_only_while_the_claim_holds(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = add_jobs(sessions, 1)
    on_disk = {"c/1", "c/2"}

    def recorded(session: Session) -> list[str]:
        query = select(Checkpoint.path).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        return list(session.scalars(query))

    with sessions() as session:
        stale = job_states.claim(session, job_id, worker="a", lease_seconds=60)
        assert stale is not None
        for step in (1, 2):
            assert job_states.add_checkpoint(session, stale, step, f"c/{step}", {}, on_disk=on_disk.__contains__)
        on_disk.discard("c/1")  # rotated out by the Trainer's save_total_limit
        session.execute(Job.__table__.update().values(status=JobStatus.QUEUED))
        session.commit()
        fresh = job_states.claim(session, job_id, worker="b", lease_seconds=60)
        assert fresh is not None
        on_disk.add("c/3")
        assert not job_states.add_checkpoint(session, stale, 3, "c/3", {}, on_disk=on_disk.__contains__)
        assert recorded(session) == ["c/1", "c/2"]  # a stale attempt neither adds nor deletes
        assert job_states.add_checkpoint(session, fresh, 3, "c/3", {}, on_disk=on_disk.__contains__)
        assert recorded(session) == ["c/2", "c/3"]


def test_a_batch_writes_its_outcomes_together_and_drops_only_the_stale_ones(
    sessions: sessionmaker[Session],
) -> None:
    ids = add_jobs(sessions, 3)
    with sessions() as session:
        claims = job_states.claim_batch(session, kind="generate", base_model="m", worker="a", lease_seconds=60, limit=3)
        assert len(claims) == 3
        stale = next(c for c in claims if c.job_id == ids[2])
        session.execute(Job.__table__.update().where(Job.id == stale.job_id).values(attempt=stale.attempt + 1))
        session.commit()
        by_id = {c.job_id: c for c in claims}
        outcomes = [
            (by_id[ids[0]], (result("ok"), None)),
            (by_id[ids[1]], (None, (ErrorCode.GENERATION_FAILED, "boom"))),
            (stale, (result("late"), None)),
        ]
        assert job_states.finish_batch(session, outcomes) == [True, True, False]
    with sessions() as session:
        rows = {j.id: j for j in session.query(Job).filter(Job.id.in_(ids))}
    assert rows[ids[0]].status == JobStatus.SUCCEEDED and rows[ids[0]].result == job_states.stored(result("ok"))
    assert rows[ids[1]].status == JobStatus.FAILED and rows[ids[1]].error == {
        "code": "generation_failed",
        "message": "boom",
    }
    assert rows[ids[2]].status == JobStatus.RUNNING and rows[ids[2]].result is None


@pytest.mark.parametrize("writer", ["finish_batch", "renew_leases", "cancel_batch"])
def test_statements_that_lock_several_running_jobs_lock_them_in_id_order(postgres_url: str, writer: str) -> None:
    """A write-back, a lease renewal and a batch's cancel lock their rows in one order (by id), so two of them never
    deadlock. Seen from outside: while one waits for its last row (by id), it already holds the rows before it,
    though the table stores that last row first."""
    import psycopg

    engine = make_engine(postgres_url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session:
        session.execute(delete(Job))
        for job_id in ("gen-z", "gen-a", "gen-m"):  # stored z first: a scan in storage order meets it first
            job = job_states.create_job(session, kind="generate", model="m", base_model="m", job_id=job_id,
                                        params=GenerationParams(prompts=["p"]), max_attempts=3)  # fmt: skip
            job.batch_id = "batch_locks"
        session.commit()
        claims = [job_states.claim(session, i, worker="w", lease_seconds=60) for i in ("gen-z", "gen-a", "gen-m")]
    assert all(claims)
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as probe:
        holder.execute("SELECT id FROM jobs WHERE id = 'gen-z' FOR UPDATE")  # the writer will wait for this row

        def write() -> None:
            with factory() as session:
                if writer == "finish_batch":
                    job_states.finish_batch(session, [(c, (result("x"), None)) for c in claims if c])
                elif writer == "renew_leases":
                    job_states.renew_leases(session, [c for c in claims if c], 60)
                else:
                    job_states.cancel_batch(session, "batch_locks")
                    session.commit()

        thread = threading.Thread(target=write)
        thread.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity"
                   " WHERE wait_event_type = 'Lock' AND datname = current_database()")  # fmt: skip
        for _ in range(200):
            if probe.execute(waiting).fetchone() == (1,):
                break
            threading.Event().wait(0.025)
        held = []
        for job_id in ("gen-a", "gen-m"):
            try:
                probe.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE NOWAIT", (job_id,))
            except psycopg.errors.LockNotAvailable:
                held.append(job_id)
        holder.rollback()
        thread.join(timeout=30)
    engine.dispose()
    assert held == ["gen-a", "gen-m"]


def test_terminal_jobs_do_not_change_again(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1)
    with sessions() as session:
        claim = job_states.claim(session, job_id, worker="a", lease_seconds=60)
        assert claim is not None
        assert job_states.fail(session, claim, ErrorCode.GENERATION_FAILED, "it broke")
        assert not job_states.succeed(session, claim, result("late"))
        assert job_states.cancel(session, job_id).status == JobStatus.FAILED  # type: ignore[union-attr]


def test_cancel_ends_a_queued_job_and_flags_a_running_one(sessions: sessionmaker[Session]) -> None:
    queued, running = add_jobs(sessions, 2)
    with sessions() as session:
        claim = job_states.claim(session, running, worker="a", lease_seconds=60)
        assert claim is not None
        assert job_states.cancel(session, queued).status == JobStatus.CANCELLED  # type: ignore[union-attr]
        flagged = job_states.cancel(session, running)
        assert flagged is not None and flagged.status == JobStatus.RUNNING and flagged.cancel_requested
        assert job_states.cancel_requested(session, claim)
        assert job_states.finish_cancelled(session, claim)
        assert session.get(Job, running, populate_existing=True).status == JobStatus.CANCELLED  # type: ignore[union-attr]
        assert job_states.cancel(session, "gen-missing") is None
