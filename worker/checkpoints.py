"""A fine-tune's checkpoints in the artifact store: each one sealed as it is written; a resume fetches the
newest sealed one of any attempt, whichever host wrote it.

The Trainer writes a checkpoint into the attempt's local scratch folder (trainer_state.json last). Each
complete one is copied into the store under the attempt's own folder and sealed (artifacts.CHECKPOINT_SEAL,
written last, lists every file with its sha256), so a checkpoint whose copy was cut short (the host died) is
never taken for complete. The Trainer's rotation (save_total_limit) is mirrored in the store, seal first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

from shared import artifacts
from shared.artifacts import CHECKPOINT_SEAL, ArtifactStore

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # written last into a local checkpoint folder: its presence means complete


def is_complete(folder: Path) -> bool:
    """Whether the Trainer finished writing a local checkpoint folder."""
    return (folder / TRAINER_STATE).is_file()


def store_checkpoint(store: ArtifactStore, folder: Path, job_id: str, attempt: int) -> str:
    """Copies a complete local checkpoint into the store and seals it; its key."""
    key = artifacts.checkpoint_key(job_id, attempt, step_of(folder.name))
    store.put_sealed(folder, key, CHECKPOINT_SEAL)
    return key


def drop_rotated(store: ArtifactStore, job_id: str, attempt: int, local_dir: Path) -> None:
    """Removes (seal first) this attempt's stored checkpoints that the Trainer no longer keeps locally."""
    kept = {p.name for p in local_dir.glob("checkpoint-*")}
    for key in store.sealed(artifacts.checkpoint_pattern(job_id, attempt), CHECKPOINT_SEAL):
        if PurePosixPath(key).name not in kept:
            store.unseal(key, CHECKPOINT_SEAL)


def last_sealed_checkpoint(store: ArtifactStore, job_id: str) -> str | None:
    """Key of the newest sealed checkpoint of any attempt of the fine-tune, or None."""
    keys = store.sealed(artifacts.checkpoint_pattern(job_id), CHECKPOINT_SEAL)
    numbered = [k for k in keys if PurePosixPath(k).name[11:].isdigit()]
    return max(numbered, key=step_of, default=None)


def fetch_checkpoint(store: ArtifactStore, key: str, into: Path) -> Path:
    """Fetches a sealed checkpoint into a new local folder under into, each file checked against the seal."""
    folder = into / PurePosixPath(key).name
    store.get_sealed(key, store.read_seal(key, CHECKPOINT_SEAL)["files"], folder)
    log.info("fetched checkpoint %s from the artifact store", key)
    return folder


def step_of(checkpoint: str | Path) -> int:
    """The training step a checkpoint folder or key (.../checkpoint-<step>) was written at."""
    return int(str(checkpoint).rsplit("-", 1)[1])


def trained_tokens_at(checkpoint: Path) -> int:
    """Trained tokens counted up to a local checkpoint (the last count its trainer_state.json logged), or 0."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    counts = [entry["trained_tokens"] for entry in state.get("log_history", []) if "trained_tokens" in entry]
    return int(counts[-1]) if counts else 0
