"""Finding a fine-tune's checkpoints on disk: the newest complete one to resume from, and what it holds.

Each attempt writes its checkpoints into its own folder (jobs/<id>/attempt-<n>/checkpoints/checkpoint-<step>);
a new attempt resumes from the newest complete one of any attempt. The Trainer writes trainer_state.json last,
so a folder that holds it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint folder: its presence means complete


def last_complete_checkpoint(job_folder: Path) -> Path | None:
    """The newest checkpoint of any attempt (attempt-<n>/checkpoints/checkpoint-<step> under the job's folder)
    that holds trainer_state.json (written last), or None."""
    found = job_folder.glob("attempt-*/checkpoints/checkpoint-*")
    complete = [p for p in found if p.name[11:].isdigit() and (p / TRAINER_STATE).is_file()]
    return max(complete, key=step_of, default=None)


def step_of(checkpoint: Path) -> int:
    """The training step a checkpoint folder (checkpoint-<step>) was written at."""
    return int(checkpoint.name.rsplit("-", 1)[1])


def trained_tokens_at(checkpoint: Path) -> int:
    """Trained tokens counted up to a checkpoint (the last count its trainer_state.json logged), or 0."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    counts = [entry["trained_tokens"] for entry in state.get("log_history", []) if "trained_tokens" in entry]
    return int(counts[-1]) if counts else 0
