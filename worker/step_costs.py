"""What a decoding step of the running batch costs by its rows, as this process measures it; the continuous loop
(worker.scheduler) uses it to decide how many rows of an OpenAI batch decode beside an interactive job.

How a step's cost grows with its rows depends on the hardware, and not along a line. On a CPU a one-row step
multiplies vectors (GEMV: the weights read once) and any larger one runs a GEMM that packs the weights first:
full-size GPT-2 in fp32 on one thread measured 38 ms at 1 row, 70 at 2, 76 at 4, 87 at 8, 148 at 28. On a GPU a
step costs about the same whatever its rows, up to a point. A fixed number of rows suits one machine only. Here
the loop records each step's seconds by its row count (a moving average per count) and lets as many extra rows
decode beside the interactive ones as keep a step within a factor of what the interactive rows alone cost,
reading a count it has not measured off the straight line between the nearest counts it has (beyond the largest,
the line through the last two). A count it guessed wrong is measured at the next step and corrected.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

SMOOTHING = 0.2  # weight of a new step in its row count's moving average


@dataclass
class StepCosts:
    """Moving averages of a step's seconds, by the number of rows it decoded."""

    seconds: dict[int, float] = field(default_factory=dict)

    def record(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        known = self.seconds.get(rows)
        self.seconds[rows] = seconds if known is None else known + SMOOTHING * (seconds - known)

    def cost(self, rows: int) -> float | None:
        """A step's seconds at this many rows: measured, else read off the line between the nearest measured
        counts (beyond the largest, the line through the last two); None below the smallest measured count or
        beyond the only one."""
        return self._cost(rows, sorted(self.seconds))

    def _cost(self, rows: int, counts: list[int]) -> float | None:
        if rows in self.seconds:
            return self.seconds[rows]
        at = bisect_left(counts, rows)
        if at == 0 or len(counts) < 2:
            return None
        low, high = (counts[at - 1], counts[at]) if at < len(counts) else (counts[-2], counts[-1])
        slope = (self.seconds[high] - self.seconds[low]) / (high - low)
        return self.seconds[low] + slope * (rows - low)

    def rows_beside(self, own: int, slowdown: float, most: int) -> int:
        """How many more rows (at most `most`) may decode beside `own` rows so that a step costs at most `slowdown`
        times what `own` rows cost alone: counting up, the first count that costs more ends it. Until what `own`
        rows cost alone is known: none, so that the next step measures it. Until a count past it was measured:
        `own`, so that the next steps measure that one (a step of twice the rows costs at most twice)."""
        if most <= 0:
            return 0
        counts = sorted(self.seconds)
        alone = self._cost(own, counts)
        if alone is None:
            return 0
        if self._cost(own + 1, counts) is None:
            return min(most, max(own, 1))
        budget = slowdown * alone
        beside = 0
        while beside < most:
            cost = self._cost(own + beside + 1, counts)
            if cost is None or cost > budget:
                break
            beside += 1
        return beside
