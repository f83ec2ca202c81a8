"""Continuous batching: rows join a running batch between steps and leave when done. The engine in process on
the real tiny GPT-2 (with real LoRA adapters); the serving loop on real Postgres and Redis, with step hooks
that act at a chosen step (a job arrives, a client cancels, an adapter vanishes)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared.artifacts import ArtifactStore
from tests.test_adapters import make_adapter, publish
from tests.test_batch_isolation import add_job, good_params, rows
from tests.test_batch_isolation import own_base as own_base
from tests.test_batch_isolation import worker_settings as worker_settings
from worker.adapter_cache import AdapterDiskCache
from worker.adapters import AdapterCache
from worker.continuous import RunningBatch, generate_continuously, new_row
from worker.generation import Request, SamplingParams, generate
from worker.model_loading import LoadedModel, load_base_model

PROMPTS = ["Below is an instruction that describes a task.", "Hello", "The quick brown fox jumps", "Reverse"]


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> LoadedModel:
    return load_base_model(str(tiny_model), "main", "fp32", "cpu")


def sampled(seed: int, max_new_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.9, seed=seed)


def test_seeded_row_draws_the_same_tokens_alone_and_while_rows_join_and_leave(loaded: LoadedModel) -> None:
    seeded = Request(PROMPTS[0], sampled(1234, 16))
    alone = generate(loaded, [seeded])[0]
    batch = RunningBatch(loaded)
    row = new_row(loaded, "seeded", seeded)
    batch.admit([new_row(loaded, "short", Request(PROMPTS[1], sampled(1, 2))), row])
    for step in range(16):
        if step in (2, 5):  # newcomers with longer prompts widen the cache on the left
            batch.admit([new_row(loaded, f"late{step}", Request(PROMPTS[2] * 3, sampled(step, 4 + step)))])
        if not row.done:
            batch.step()
    assert row.generation(loaded) == alone


def test_paused_rows_keep_their_cache_and_draw_the_same_tokens_as_rows_never_paused(loaded: LoadedModel) -> None:
    requests = [Request(p, sampled(40 + i, 10)) for i, p in enumerate(PROMPTS)]
    requests.append(Request(PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=0)))
    alone = [generate(loaded, [r])[0] for r in requests]
    batch = RunningBatch(loaded)
    rows = [new_row(loaded, i, r) for i, r in enumerate(requests)]
    batch.admit(rows)
    for step in range(40):
        if step == 1:
            batch.pause(lambda row: row.key in (0, 2, 4))
        if step == 3:  # a newcomer joins while rows are paused, a paused row comes back, one is cancelled
            batch.admit([new_row(loaded, "late", Request(PROMPTS[2] * 3, sampled(7, 3)))])
            batch.resume(lambda row: row.key == 2)
            assert [row.key for row in batch.remove(lambda row: row.key == 3)] == [3]
        if step == 6:
            batch.pause(lambda row: row.key == 1)
        if step == 8:
            batch.resume(lambda row: True)
        batch.step()
    assert batch.paused is None and not len(batch)
    assert [rows[i].generation(loaded) for i in (0, 1, 2, 4)] == [alone[i] for i in (0, 1, 2, 4)]


def test_continuous_outputs_equal_static_outputs_greedy_and_seeded(loaded: LoadedModel) -> None:
    requests = [Request(p, SamplingParams(max_new_tokens=4 + 5 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    requests += [Request(p, sampled(i, 3 + 7 * i)) for i, p in enumerate(PROMPTS)]
    (free,) = generate(loaded, [Request(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=0))])
    cut = SamplingParams(max_new_tokens=16, temperature=0, stop=(free.text[3:5],), logprobs=2)
    requests += [
        Request(PROMPTS[0], cut),
        Request(PROMPTS[1], SamplingParams(max_new_tokens=6, temperature=0, logprobs=0)),
    ]
    continuous, static = generate_continuously(loaded, requests), generate(loaded, requests)
    # Tokens and texts are the same; logprobs agree up to the float noise of a different batch shape.
    assert [replace(g, logprobs=None) for g in continuous] == [replace(g, logprobs=None) for g in static]
    for c, s in zip(continuous, static, strict=True):
        assert (c.logprobs is None) == (s.logprobs is None)
        for a, b in zip(c.logprobs or [], s.logprobs or [], strict=True):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert continuous[-2].finish_reason == "stop" and continuous[-1].logprobs  # stop strings and logprobs hold


def test_grouped_lora_rows_are_token_identical_to_each_adapter_alone(tiny_model: Path, tmp_path: Path) -> None:
    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    store = ArtifactStore((tmp_path / "store").as_uri(), {"auto_mkdir": True})
    cache = AdapterCache(loaded, capacity=4, disk=AdapterDiskCache(store, tmp_path / "cache", 2**30))
    folders = {
        f"ft:{i}": publish(store, make_adapter(tiny_model, tmp_path / f"a{i}", seed=i), f"a{i}") for i in range(3)
    }
    names = list(cache.ensure(folders).values())
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    # Interleaved on purpose: the running batch regroups its rows by adapter.
    requests = [Request(p, greedy, adapter=a) for p in PROMPTS for a in [None, *names]]
    alone = [generate(loaded, [r])[0] for r in requests]  # peft's own path, one row at a time
    assert generate_continuously(loaded, requests) == alone
    assert len({g.text for g in alone}) > len(PROMPTS)  # the adapters change the output


def serve(settings: Any, hook: Callable[[Any], None], models: Any = None) -> list[Any]:
    """Runs the serving loop with a step hook (on these models, else the settings' own); every report it saw."""
    from worker.scheduler import serve_continuously
    from worker.serving import ModelHolder

    reports: list[Any] = []

    def record(report: Any) -> None:
        reports.append(report)
        hook(report)

    every_step = settings.model_copy(update={"batch_poll_seconds": 0})  # a newcomer or a cancel seen at once
    serve_continuously(every_step, models or ModelHolder(settings), hooks=[record])
    return reports


def step_of(reports: list[Any], job_id: str) -> int:
    """The step at which a job ended."""
    return next(r.step for r in reports if job_id in r.finished)


def test_job_arriving_mid_batch_finishes_before_its_long_neighbour(worker_settings: Any) -> None:
    base = worker_settings.base_model
    long = add_job(base, "bob", good_params(PROMPTS[0], max_tokens=40, temperature=1.0, seed=7))
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 3:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=3, temperature=1.0, seed=1)))

    reports = serve(worker_settings, arrive)

    (short,) = arrived
    joined_at = next(r.step for r in reports if short in r.joined)
    assert joined_at == 4 and long in reports[joined_at - 1].in_flight  # it joined the running batch
    assert step_of(reports, short) < step_of(reports, long)
    found = rows([long, short])
    assert found[short].finished_at < found[long].finished_at
    assert found[long].result["outputs"][0]["completion_tokens"] > 8  # the long one was still going
    assert found[short].result["batch_size"] == 2


def add_batch_requests(base: str, count: int, max_tokens: int, first: int = 0) -> list[str]:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import GenerationParams

    with get_sessionmaker()() as session:
        params = GenerationParams.model_validate(good_params(PROMPTS[0], max_tokens=max_tokens))
        jobs = [
            job_states.create_batch_request(session, batch_id="batch_b", custom_id=f"c{i}", line=i + 1, model=base,
                                            base_model=base, params=params, max_attempts=3, tenant="bulk")
            for i in range(first, first + count)
        ]  # fmt: skip
        session.commit()
        return [job.id for job in jobs]


def test_batch_requests_that_end_at_different_steps_are_written_together_when_the_batch_empties(
    worker_settings: Any,
) -> None:
    from worker.scheduler import serve_continuously
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"batch_poll_seconds": 60, "batch_join_rows": 8})
    base = settings.base_model
    bulk = [job for i, tokens in enumerate([3, 5, 7, 9]) for job in add_batch_requests(base, 1, tokens, i)]
    reports: list[Any] = []

    serve_continuously(settings, ModelHolder(settings), hooks=[reports.append])

    written = [r for r in reports if r.finished]
    assert len(written) == 1 and set(written[0].finished) == set(bulk)  # one write, not one per step
    assert written[0].step == reports[-1].step and not written[0].in_flight
    found = rows(bulk)
    assert [found[j].result["outputs"][0]["completion_tokens"] for j in bulk] == [3, 5, 7, 9]


def test_batch_requests_are_written_a_join_wave_at_a_time(worker_settings: Any) -> None:
    from worker.scheduler import serve_continuously
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"batch_poll_seconds": 60, "batch_join_rows": 2})
    base = settings.base_model
    bulk = [job for i, tokens in enumerate([3, 5, 7, 9]) for job in add_batch_requests(base, 1, tokens, i)]
    reports: list[Any] = []

    serve_continuously(settings, ModelHolder(settings), hooks=[reports.append])

    assert [set(r.finished) for r in reports if r.finished] == [set(bulk[:2]), set(bulk[2:])]
    assert all(r.status == "succeeded" for r in rows(bulk).values())


def test_a_loop_that_raises_writes_the_finished_batch_requests_still_waiting_on_its_way_out(
    worker_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.scheduler import ContinuousLoop, serve_continuously
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"batch_poll_seconds": 60, "batch_join_rows": 8})
    base = settings.base_model
    done, cut = add_batch_requests(base, 2, max_tokens=2), add_batch_requests(base, 2, max_tokens=30, first=2)
    reports: list[Any] = []
    prioritize = ContinuousLoop._prioritize

    def failing(loop: ContinuousLoop) -> None:
        if len(reports) == 5:  # the first two ended at step 1 and wait to be written with others
            raise RuntimeError("the loop fails mid-batch")
        prioritize(loop)

    monkeypatch.setattr(ContinuousLoop, "_prioritize", failing)
    with pytest.raises(RuntimeError, match="mid-batch"):
        serve_continuously(settings, ModelHolder(settings), hooks=[reports.append])

    assert not any(r.finished for r in reports)  # nothing was written while it ran...
    found = rows(done + cut)
    assert [found[j].status for j in done] == ["succeeded", "succeeded"]  # ...and they were on its way out
    assert [found[j].status for j in cut] == ["running", "running"]  # left to their leases, as before


def test_a_draining_worker_writes_each_finished_batch_request_at_once(worker_settings: Any) -> None:
    from worker import scheduler
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"batch_poll_seconds": 60, "batch_join_rows": 8})
    base = settings.base_model
    (short,), (long,) = add_batch_requests(base, 1, max_tokens=3), add_batch_requests(base, 1, max_tokens=9, first=1)
    reports: list[Any] = []

    def drain_after_the_first_step(report: Any) -> None:
        reports.append(report)
        scheduler.stop_claiming.set()  # a warm shutdown: a kill may follow at any time

    try:
        scheduler.serve_continuously(settings, ModelHolder(settings), hooks=[drain_after_the_first_step])
    finally:
        scheduler.stop_claiming.clear()

    assert step_of(reports, short) == 2 and step_of(reports, long) == 8  # each the step its rows ended


def test_an_interactive_job_is_written_the_step_it_ends_with_the_batch_requests_that_ended_before(
    worker_settings: Any,
) -> None:
    from worker.scheduler import serve_continuously
    from worker.serving import ModelHolder

    # A look at every step: what holds the batch request's outcome back is the interactive job in flight.
    settings = worker_settings.model_copy(update={"batch_poll_seconds": 0, "batch_join_rows": 8,
                                                  "interactive_slowdown": 0})  # fmt: skip  # the batch row never pauses
    interactive = add_job(settings.base_model, "alice", good_params(PROMPTS[1], max_tokens=8))
    (early,) = add_batch_requests(settings.base_model, 1, max_tokens=3)  # joins beside it, ends first
    reports: list[Any] = []

    serve_continuously(settings, ModelHolder(settings), hooks=[reports.append])

    assert set(reports[0].joined) == {interactive, early}
    (written,) = [r for r in reports if interactive in r.finished]
    assert written.step == 7  # its first token from the prefill, 7 more from 7 steps: written when it ended
    assert set(written.finished) == {interactive, early}  # the batch request's outcome waited for that write
    assert all(r.status == "succeeded" for r in rows([interactive, early]).values())


def test_a_batch_row_that_ends_beside_an_interactive_job_does_not_send_the_loop_claiming_rows_it_cannot_fill(
    worker_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared import job_states
    from worker.scheduler import serve_continuously
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"batch_poll_seconds": 60, "batch_rows_beside_interactive": 2})
    base = settings.base_model
    interactive = add_job(base, "alice", good_params(PROMPTS[1], max_tokens=14))
    first = add_batch_requests(base, 1, max_tokens=2)  # joins with it (the one batch request a first claim takes)
    short, long = add_batch_requests(base, 1, max_tokens=4, first=1) + add_batch_requests(base, 1, 14, first=2)
    reports: list[Any] = []
    claims_at: list[int] = []  # the step before each claim
    real = job_states.claim_batch

    def counted(session: Any, **kwargs: Any) -> Any:
        claims_at.append(len(reports))
        return real(session, **kwargs)

    monkeypatch.setattr(job_states, "claim_batch", counted)

    serve_continuously(settings, ModelHolder(settings), hooks=[reports.append])

    assert set(reports[0].joined) == {interactive, *first}
    joined = next(r.step for r in reports if short in r.joined)
    assert long in reports[joined - 1].joined  # both fill the rows beside it once the first one ended
    interactive_ended = step_of(reports, interactive)
    assert joined + 3 < interactive_ended  # the short one's 4 tokens ended while the long one still decoded...
    assert not [s for s in claims_at if joined <= s < interactive_ended]  # ...and no claim went looking
    assert all(r.status == "succeeded" for r in rows([interactive, *first, short, long]).values())


def test_batch_requests_leave_rows_free_so_an_interactive_job_joins_at_the_next_step(worker_settings: Any) -> None:
    settings = worker_settings.model_copy(update={"max_batch_size": 4, "batch_reserved_rows": 1})
    base = settings.base_model
    bulk = add_batch_requests(base, 6, max_tokens=12)
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 2:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=2)))

    reports = serve(settings, arrive)

    (interactive,) = arrived
    assert reports[0].rows == 3 and set(reports[0].in_flight) == set(bulk[:3])  # one row kept free
    assert next(r.step for r in reports if interactive in r.joined) == 3  # not after the batch rows end
    assert step_of(reports, interactive) < min(step_of(reports, job_id) for job_id in bulk)
    assert max(r.rows for r in reports) <= 4 and all(r.status == "succeeded" for r in rows(bulk).values())


def test_interactive_jobs_needing_more_rows_than_are_kept_free_join_at_the_next_step_pausing_batch_rows(
    worker_settings: Any,
) -> None:
    settings = worker_settings.model_copy(update={"max_batch_size": 4, "batch_reserved_rows": 1,
                                                  "interactive_slowdown": 0})  # fmt: skip
    base = settings.base_model
    bulk = add_batch_requests(base, 3, max_tokens=12)
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 2:  # two rows wanted, one kept free
            arrived.extend(add_job(base, user, good_params(PROMPTS[1], max_tokens=3)) for user in ("alice", "bob"))

    reports = serve(settings, arrive)

    assert reports[0].rows == 3
    assert all(next(r.step for r in reports if job_id in r.joined) == 3 for job_id in arrived)  # both at once
    assert max(r.rows for r in reports) == 4  # a batch row paused for the second one
    assert max(step_of(reports, job_id) for job_id in arrived) < min(step_of(reports, job_id) for job_id in bulk)
    assert all(row.status == "succeeded" for row in rows([*bulk, *arrived]).values())


def test_batch_requests_fill_every_row_and_an_interactive_job_joins_at_the_next_step_pausing_the_youngest(
    worker_settings: Any,
) -> None:
    settings = worker_settings.model_copy(update={"max_batch_size": 4, "batch_reserved_rows": 0,
                                                  "interactive_slowdown": 0})  # fmt: skip
    base = settings.base_model
    bulk = add_batch_requests(base, 4, max_tokens=12)
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 2:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=3)))

    reports = serve(settings, arrive)

    (interactive,) = arrived
    joined, ended = next(r.step for r in reports if interactive in r.joined), step_of(reports, interactive)
    assert reports[0].rows == 4 and set(reports[0].in_flight) == set(bulk)  # no row kept free
    assert joined == 3  # it did not wait for a batch row to end
    assert all(r.rows == 4 for r in reports[joined - 1 : ended])  # itself and 3 batch rows: one paused
    assert ended < min(step_of(reports, job_id) for job_id in bulk)
    # The youngest batch row waited out the interactive job's steps, then ended as many steps after the others.
    assert step_of(reports, bulk[3]) - step_of(reports, bulk[0]) == ended - joined + 1
    done = rows([*bulk, interactive])
    assert all(row.status == "succeeded" for row in done.values())
    assert all(row.result["batch_size"] <= 4 for row in done.values())
    # The paused row drew what its neighbours drew (same prompt, greedy): pausing changed none of its tokens.
    assert len({done[job_id].result["outputs"][0]["text"] for job_id in bulk}) == 1


def test_batch_rows_over_the_cap_pause_while_an_interactive_job_decodes_and_resume_after(worker_settings: Any) -> None:
    settings = worker_settings.model_copy(
        update={"max_batch_size": 8, "batch_reserved_rows": 1, "batch_rows_beside_interactive": 2}
    )
    base = settings.base_model
    bulk = add_batch_requests(base, 7, max_tokens=12)
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 2:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=4)))

    reports = serve(settings, arrive)

    (interactive,) = arrived
    joined, ended = next(r.step for r in reports if interactive in r.joined), step_of(reports, interactive)
    assert reports[0].rows == 7  # the batch alone takes every row but the reserved one
    assert joined == 3 and all(r.rows == 3 for r in reports[joined - 1 : ended])  # itself and 2 batch rows
    assert reports[ended].rows == 7  # then the 5 paused rows decode again beside the 2 that went on
    assert all(r.status == "succeeded" for r in rows(bulk).values())


@pytest.mark.parametrize(
    ("slowdown", "beside"),
    [(1.25, 1), (1.6, 2), (0, 6)],  # 0: no limit, every batch row in flight decodes beside it
)
def test_batch_rows_beside_an_interactive_job_are_as_many_as_its_step_costs_allow(
    worker_settings: Any, slowdown: float, beside: int
) -> None:
    from worker.serving import ModelHolder

    settings = worker_settings.model_copy(update={"max_batch_size": 8, "batch_reserved_rows": 1,
                                                  "batch_rows_beside_interactive": 0,
                                                  "interactive_slowdown": slowdown})  # fmt: skip
    base = settings.base_model
    bulk = add_batch_requests(base, 6, max_tokens=12)
    models = ModelHolder(settings)
    # A machine where each row costs time (30 ms a step + 10 ms a row, as this process would have measured it),
    # set again after every step: the tiny model's own steps cost about the same whatever their rows.
    cpu_like = {1: 0.040, 4: 0.070, 8: 0.110}
    models.step_costs.seconds = dict(cpu_like)
    arrived: list[str] = []

    def arrive(report: Any) -> None:
        models.step_costs.seconds = dict(cpu_like)
        if report.step == 2:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=4)))

    reports = serve(settings, arrive, models)

    (interactive,) = arrived
    joined, ended = next(r.step for r in reports if interactive in r.joined), step_of(reports, interactive)
    assert reports[0].rows == 6
    # within 1.25 x 40 ms: 2 rows (50 ms), 1 beside; within 1.6 x 40 ms: 3 rows (60 ms), 2 beside
    assert all(r.rows == 1 + beside for r in reports[joined - 1 : ended])
    assert reports[ended].rows == 6  # then every batch row decodes again
    assert all(r.status == "succeeded" for r in rows(bulk).values())


def test_an_interactive_job_joins_alone_not_in_one_prefill_with_batch_requests(worker_settings: Any) -> None:
    settings = worker_settings.model_copy(update={"max_batch_size": 8, "batch_reserved_rows": 1,
                                                  "interactive_slowdown": 0})  # fmt: skip
    base = settings.base_model
    first = add_batch_requests(base, 4, max_tokens=14)  # 4 rows in flight, room for 3 more
    arrived: list[str] = []
    late: list[str] = []

    def arrive(report: Any) -> None:
        if report.step == 2:
            arrived.append(add_job(base, "alice", good_params(PROMPTS[1], max_tokens=3)))
            late.extend(add_batch_requests(base, 3, max_tokens=4))  # waiting beside it, room for them too

    reports = serve(settings, arrive)

    (interactive,) = arrived
    joined = next(r for r in reports if interactive in r.joined)
    assert joined.joined == (interactive,)  # its prefill and first token, without the batch requests'
    assert all(step_of(reports, interactive) <= next(r.step for r in reports if job in r.joined) for job in late)
    assert all(r.status == "succeeded" for r in rows(first + late).values())


def test_the_loop_records_what_each_decoding_step_cost_by_its_rows(worker_settings: Any) -> None:
    from worker.serving import ModelHolder

    models = ModelHolder(worker_settings)
    add_batch_requests(worker_settings.base_model, 3, max_tokens=6)

    reports = serve(worker_settings, lambda report: None, models)

    decoded = {r.rows for r in reports if r.rows}
    assert decoded and set(models.step_costs.seconds) == decoded
    assert all(0 < seconds < 5 for seconds in models.step_costs.seconds.values())


def test_cancel_of_running_job_leaves_the_batch_at_the_next_step(worker_settings: Any) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker

    base = worker_settings.base_model
    doomed = add_job(base, "bob", good_params(PROMPTS[0], max_tokens=60, temperature=1.0, seed=3))
    kept = add_job(base, "bob", good_params(PROMPTS[2], max_tokens=12, temperature=1.0, seed=4))

    def cancel_at_step_3(report: Any) -> None:
        if report.step == 3:
            with get_sessionmaker()() as session:
                job_states.cancel(session, doomed)

    reports = serve(worker_settings, cancel_at_step_3)

    assert step_of(reports, doomed) == 4
    assert reports[3].rows == 1  # step 4 decoded only the other job's row
    found = rows([doomed, kept])
    assert found[doomed].status == "cancelled" and found[kept].status == "succeeded"


def test_with_only_batch_requests_in_flight_the_loop_looks_for_cancels_once_a_second_and_still_ends_them(
    worker_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from shared import job_states
    from shared.db import get_sessionmaker
    from worker import scheduler

    looks: list[float] = []
    real = job_states.cancels_requested

    def counted(session: Any, claims: Any) -> set[str]:
        looks.append(time.perf_counter())
        return real(session, claims)

    monkeypatch.setattr(job_states, "cancels_requested", counted)
    real_claim = job_states.claim_batch

    def slow_first_claim(session: Any, **kwargs: Any) -> Any:
        claims = real_claim(session, **kwargs)
        if not looks:  # the first claim, before the first look, takes as long as a model's first load may
            time.sleep(0.9)
        return claims

    monkeypatch.setattr(job_states, "claim_batch", slow_first_claim)
    bulk = add_batch_requests(worker_settings.base_model, 2, max_tokens=60)

    def cancel_at_step_3(report: Any) -> None:
        time.sleep(0.05)  # 60 steps take 3 s or more: the cancel is seen long before the requests end
        if report.step == 3:
            with get_sessionmaker()() as session:
                job_states.cancel_batch(session, "batch_b")
                session.commit()

    reports = serve(worker_settings, cancel_at_step_3)  # batch_poll_seconds 0: it would look at every step

    assert all(r.status == "cancelled" for r in rows(bulk).values())
    assert 3 < step_of(reports, bulk[0]) < 60 and step_of(reports, bulk[0]) == step_of(reports, bulk[1])
    assert len(looks) < len(reports)  # not at every step
    # At most once a second (the loop times its looks from the start of an iteration, this from inside the look).
    assert all(b - a > 0.8 * scheduler.BATCH_LAG_SECONDS for a, b in itertools.pairwise(looks))


def test_row_whose_decoding_fails_fails_alone_and_the_rest_are_unchanged(worker_settings: Any, tmp_path: Path) -> None:
    from shared import job_states
    from shared.artifacts import ADAPTER_SEAL
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneParams
    from shared.models import FineTunedModel
    from worker.scheduler import ContinuousLoop
    from worker.serving import ModelHolder

    base = worker_settings.base_model
    store = ArtifactStore.from_settings(worker_settings)
    make_adapter(Path(base), tmp_path / "kept", seed=5)
    files = store.put_sealed(tmp_path / "kept", "adapters/kept", ADAPTER_SEAL, {})
    with get_sessionmaker()() as session:
        owner = job_states.create_job(session, kind="train", model=base, base_model=base,
                                      params=FineTuneParams(hyperparameters={}), max_attempts=1,
                                      tenant="alice")  # fmt: skip
        session.flush()
        adapter = f"ft:tiny:kept:{owner.id}"
        session.add(FineTunedModel(id=adapter, tenant="alice", job_id=owner.id, base_model=base,
                                   path="adapters/kept", manifest={"files": files}))  # fmt: skip
        session.commit()

    def jobs() -> dict[str, str]:
        params = good_params(PROMPTS[0], max_tokens=10)
        return {"base": add_job(base, "bob", params), "kept": add_job(base, "bob", params, model=adapter),
                "broken": add_job(base, "bob", good_params(PROMPTS[1], max_tokens=10))}  # fmt: skip

    first = jobs()
    loop: ContinuousLoop | None = None

    def break_a_row_at_step_2(report: Any) -> None:
        # From the next step on, peft itself refuses the row in the middle of the batched forward pass: it names
        # an adapter that is not loaded (and so does its job, when it is decoded again).
        if report.step == 2 and loop is not None:
            broken = loop.jobs[first["broken"]]
            broken.job.requests[0] = replace(broken.job.requests[0], adapter="ft_not_loaded")
            broken.rows[0].request = broken.job.requests[0]

    loop = ContinuousLoop(worker_settings, ModelHolder(worker_settings), [break_a_row_at_step_2])
    loop.run()
    found = rows(list(first.values()))
    assert found[first["broken"]].status == "failed"
    assert found[first["broken"]].error["code"] == "generation_failed"
    assert "ft_not_loaded" in found[first["broken"]].error["message"]
    again = jobs()  # the same jobs on a healthy worker
    ContinuousLoop(worker_settings, ModelHolder(worker_settings), []).run()
    found_again = rows(list(again.values()))
    for name in ("base", "kept"):
        assert found[first[name]].status == "succeeded"
        assert found[first[name]].result["outputs"] == found_again[again[name]].result["outputs"]


def test_jobs_whose_write_back_fails_are_left_to_their_leases_not_renewed_for_ever(
    worker_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database going away while finished jobs are written back: they have left the running batch, the loop
    # stops, and their leases must stop being renewed so that the reaper requeues them (a Postgres crash in the
    # chaos suite once left a job running for good this way).
    from sqlalchemy.exc import OperationalError

    from worker import scheduler
    from worker.leases import lease_keeper

    base = worker_settings.base_model
    short = add_job(base, "bob", good_params(PROMPTS[0], max_tokens=2))
    long = add_job(base, "bob", good_params(PROMPTS[1], max_tokens=40))

    def database_gone(*_: Any) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(scheduler, "_write_back", database_gone)
    with pytest.raises(OperationalError):
        serve(worker_settings, lambda _: None)
    assert not {short, long} & set(lease_keeper(worker_settings.lease_seconds).job_ids())
    assert {r.status for r in rows([short, long]).values()} == {"running"}  # nothing written: the reaper's to requeue
