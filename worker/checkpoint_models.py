"""Checkpoints served as models: where a checkpoint model id's adapter weights are in the store.

A stored checkpoint is the Trainer's whole folder (optimizer, scheduler, RNG state besides the LoRA weights),
sealed with CHECKPOINT_SEAL. Serving needs only the adapter, so the StoredAdapter lists just the adapter's
files from the seal (with their sha256): a generate worker fetches and checks those, never the optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.artifacts import CHECKPOINT_SEAL, ArtifactMissing, ArtifactStore
from shared.job_data import FineTuneParams
from shared.model_ids import fine_tuned_model_id, parse_checkpoint_id
from shared.models import Checkpoint, Job
from worker.adapter_cache import StoredAdapter

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def checkpoint_adapters(session: Session, store: ArtifactStore, model_ids: Iterable[str]) -> dict[str, StoredAdapter]:
    """The stored adapter of every checkpoint model id among model_ids that names a recorded checkpoint."""
    found: dict[str, StoredAdapter] = {}
    for model_id in model_ids:
        ref = parse_checkpoint_id(model_id)
        if ref is None:
            continue
        row = session.execute(
            select(Checkpoint.path, Job.base_model, Job.params)
            .join(Job, Job.id == Checkpoint.job_id)
            .where(Checkpoint.job_id == ref.job_id, Checkpoint.step == ref.step)
        ).first()
        if row is None:
            continue
        suffix = FineTuneParams.model_validate(row.params).suffix
        if fine_tuned_model_id(row.base_model, suffix, ref.job_id) != ref.model_id:
            continue
        try:
            files = store.read_seal(row.path, CHECKPOINT_SEAL)["files"]
        except ArtifactMissing:
            log.warning("checkpoint %s is recorded but not sealed in the store", row.path)
            continue
        found[model_id] = StoredAdapter(key=row.path, files={n: files[n] for n in ADAPTER_FILES if n in files})
    return found
