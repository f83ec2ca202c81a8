"""Streaming: turns the growing token lists of a batch into text deltas for jobs that asked to stream.

Each delta is text that the final output is certain to start with: a stop string that may still be
forming, and an unfinished UTF-8 character, are held back until they resolve. The gateway sends
whatever the final output has beyond the deltas when the job finishes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from shared.notify import publish_deltas
from worker.generation import decode
from worker.model_loading import LoadedModel


@dataclass(frozen=True)
class StreamRow:
    """Where a batch row's text goes: which job, which of its outputs, and its stop strings."""

    job_id: str
    attempt: int
    output_index: int
    stop: tuple[str, ...]


def settled_text(text: str, stop: Sequence[str]) -> str:
    """The part of the text generated so far that the final output is sure to start with."""
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    if positions:
        return text[: min(positions)]
    if stop:
        text = text[: max(0, len(text) - (max(len(s) for s in stop) - 1))]
    return text.rstrip("\ufffd")


class DeltaPublisher:
    """Called after every decoding step; publishes one message per streaming job with its new text."""

    def __init__(self, loaded: LoadedModel, rows: Sequence[StreamRow | None]) -> None:
        self.loaded = loaded
        self.rows = rows
        self.sent = [0] * len(rows)  # characters of each row already published

    def __call__(self, generated: Sequence[Sequence[int]]) -> None:
        deltas: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            text = settled_text(decode(self.loaded, list(generated[i])), row.stop)
            if len(text) > self.sent[i]:
                deltas[(row.job_id, row.attempt)][row.output_index] = text[self.sent[i] :]
                self.sent[i] = len(text)
        for (job_id, attempt), job_deltas in deltas.items():
            publish_deltas(job_id, attempt, job_deltas)
