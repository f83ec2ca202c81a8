"""Streaming: turns the growing token lists of a batch into text deltas for jobs that asked to stream.

Each delta is text that the final output is certain to start with: a stop string that may still be
forming, and an unfinished UTF-8 character, are held back until they resolve. The gateway sends
whatever the final output has beyond the deltas when the job finishes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from shared.notify import publish_deltas
from worker.generation import decode
from worker.model_loading import LoadedModel

log = logging.getLogger(__name__)


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
    """Called after every decoding step; publishes one message per streaming job with its new text.

    sent (text already published, per job and output) may be shared by the publishers of several decoding runs:
    a row decoded again after its batch failed then publishes only what goes beyond that text. A job whose
    publishing fails stops streaming (its client gets the rest with the final result); the batch goes on.
    """

    def __init__(
        self, loaded: LoadedModel, rows: Sequence[StreamRow | None], sent: dict[tuple[str, int], str] | None = None
    ) -> None:
        self.loaded = loaded
        self.rows = list(rows)
        self.sent = sent if sent is not None else {}

    def __call__(self, generated: Sequence[Sequence[int]]) -> None:
        deltas: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            try:
                text = settled_text(decode(self.loaded, list(generated[i])), row.stop)
            except Exception:
                log.exception("could not decode the text of %s for streaming; it stops streaming", row.job_id)
                self._stop(row.job_id)
                continue
            key = (row.job_id, row.output_index)
            before = self.sent.get(key, "")
            if len(text) > len(before) and text.startswith(before):
                deltas[(row.job_id, row.attempt)][row.output_index] = text[len(before) :]
                self.sent[key] = text
        for (job_id, attempt), job_deltas in deltas.items():
            try:
                publish_deltas(job_id, attempt, job_deltas)
            except Exception:
                log.exception("could not publish the text of %s; it stops streaming", job_id)
                self._stop(job_id)

    def _stop(self, job_id: str) -> None:
        self.rows = [None if row is not None and row.job_id == job_id else row for row in self.rows]
