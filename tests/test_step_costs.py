"""worker.step_costs: how many batch rows decode beside an interactive job, from what this process's steps cost."""

from __future__ import annotations

import pytest

from worker.step_costs import StepCosts

# Full-size GPT-2, fp32, one CPU thread (seconds a step, by rows): one row multiplies vectors, more run a GEMM.
CPU = {1: 0.038, 2: 0.070, 4: 0.076, 8: 0.087, 16: 0.108, 28: 0.148}


def test_where_a_second_row_doubles_the_step_no_batch_row_joins_an_interactive_one_at_1_25x() -> None:
    cpu = StepCosts(dict(CPU))

    assert cpu.rows_beside(1, 1.25, 31) == 0  # 2 rows cost 70 ms against 47.5 allowed
    assert cpu.rows_beside(1, 2.0, 31) == 3  # up to 76 ms: 4 rows in all
    assert cpu.rows_beside(2, 1.25, 30) == 6  # 8 rows cost 87 ms, within 1.25 x 70
    assert cpu.rows_beside(1, 1.0, 31) == 0


def test_where_a_step_costs_the_same_whatever_its_rows_every_batch_row_decodes_beside() -> None:
    gpu = StepCosts({rows: 0.012 for rows in (1, 4, 16, 32)})

    assert gpu.rows_beside(1, 1.25, 31) == 31


def test_a_count_not_measured_is_read_off_the_line_and_corrected_once_measured() -> None:
    costs = StepCosts({1: 0.038, 8: 0.087})

    assert costs.cost(2) == pytest.approx(0.045)
    assert costs.rows_beside(1, 1.25, 31) == 1  # 45 ms read off the line, within 47.5
    costs.record(2, 0.070)  # the step beside it measured what a GEMM costs

    assert costs.rows_beside(1, 1.25, 31) == 0
    assert costs.cost(40) == pytest.approx(0.087 + (0.087 - 0.070) / 6 * 32)  # beyond: the last two counts' line


def test_interactive_rows_decode_alone_until_their_cost_is_known_then_beside_as_many_to_learn_more() -> None:
    costs = StepCosts({24: 0.140})  # a worker that has decoded only batch-sized steps
    assert costs.rows_beside(1, 1.25, 31) == 0  # 1 row's cost unknown: it decodes alone once, and is measured
    costs.record(1, 0.038)
    assert costs.rows_beside(1, 1.25, 31) == 2  # read off the line to 24 rows: 3 rows 46.9 ms, within 47.5
    costs.record(3, 0.072)  # what 3 rows really cost on a CPU
    assert costs.rows_beside(1, 1.25, 31) == 0
    fresh = StepCosts({3: 0.05})
    assert fresh.rows_beside(3, 1.25, 31) == 3  # only its own count known: as many again, to measure one more
    assert fresh.rows_beside(3, 1.25, 1) == 1
    assert fresh.rows_beside(3, 1.25, 0) == 0
    assert fresh.rows_beside(3, 1.25, -2) == 0  # more interactive rows than the batch holds: none beside


def test_each_row_count_follows_its_recent_steps() -> None:
    costs = StepCosts(dict(CPU))
    for _ in range(60):  # the machine got quieter for GEMMs of a few rows
        costs.record(2, 0.040)
        costs.record(4, 0.046)

    assert costs.seconds[2] == pytest.approx(0.040, rel=1e-3)
    assert costs.rows_beside(1, 1.25, 31) == 3  # 2 to 4 rows now within 47.5 ms


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1.0])
def test_a_step_time_that_is_no_time_is_not_recorded(seconds: float) -> None:
    costs = StepCosts()
    costs.record(4, seconds)
    costs.record(0, 0.01)

    assert costs.seconds == {}


@pytest.mark.parametrize("slowdown", [0.5, 0.99])
def test_a_slowdown_below_one_is_refused_naming_the_setting(slowdown: float) -> None:
    from pydantic import ValidationError

    from shared.settings import Settings

    with pytest.raises(ValidationError, match="interactive_slowdown is a factor of at least 1"):
        Settings(interactive_slowdown=slowdown)
    assert Settings(interactive_slowdown=0).interactive_slowdown == 0
