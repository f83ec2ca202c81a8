"""Publishing a finished fine-tune: the adapter (LoRA weights + manifest.json) in the store, its result files
(worker/result_files.py), its model row, success.

The adapter is saved into a local folder, then copied into the attempt's own folder of the artifact store
(artifacts.adapter_key) with manifest.json written last: the manifest lists every file with its sha256, so it
is the adapter's seal, and generate workers check what they fetch against it. The fine-tuned model row
(which carries the manifest) and the job's success are one guarded write: an attempt that lost its claim
removes its stored folder and records nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session

from shared import artifacts, job_states
from shared.artifacts import ADAPTER_SEAL, ArtifactStore
from shared.chat_templates import ALPACA_CHAT_TEMPLATE
from shared.fine_tuning import ResolvedHyperparameters
from shared.job_data import Figures, FineTuneParams, FineTuneResult, SampleGeneration
from shared.job_states import Claim
from shared.model_ids import fine_tuned_model_id
from shared.models import FineTunedModel, Job, utcnow
from shared.prompts import TEMPLATE
from shared.settings import Settings
from worker.alpaca_data import RESPONSE_PREFIX, TrainingData
from worker.guarded_writes import ClaimLost, add_event
from worker.model_loading import LoadedModel
from worker.result_files import store_result_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedAdapter:
    """What a finished training run hands over to be published, and what its manifest records."""

    model: Any  # the trained peft model (trainer.model): save_pretrained writes the LoRA weights only
    loaded: LoadedModel  # the base it was trained on: its commit hash and its tokenizer's EOS
    data: TrainingData  # data.source: which files or hub dataset, with their sha256
    hp: ResolvedHyperparameters
    seed: int
    metrics: Figures  # at least trained_tokens
    chat_template: str = ALPACA_CHAT_TEMPLATE  # what the examples were rendered with; serving renders with it too
    log_history: list[dict[str, Any]] = field(default_factory=list)  # trainer.state.log_history: the metrics CSV
    lineage: list[str] = field(default_factory=list)  # the models it continued from, back to the base
    samples: list[SampleGeneration] = field(default_factory=list)  # its answers to validation prompts, and the base's


def publish_adapter(session: Session, claim: Claim, settings: Settings, adapter: TrainedAdapter, local: Path) -> None:
    """Stores the adapter and its manifest (saved first into the new local folder `local`), then records the
    fine-tuned model and the job's success.

    Raises ClaimLost (after removing this attempt's stored adapter) when another attempt owns the job.
    """
    job: Job = claim.job
    params = FineTuneParams.model_validate(job.params)
    model_id = fine_tuned_model_id(job.base_model, params.suffix, job.id)
    relative_dir = artifacts.adapter_key(job.id, claim.attempt)
    store = ArtifactStore.from_settings(settings)
    adapter.model.save_pretrained(local, safe_serialization=True)
    # The adapter's tokenizer config carries the template it was trained with (as does its manifest).
    adapter.loaded.tokenizer.chat_template = adapter.chat_template
    adapter.loaded.tokenizer.save_pretrained(local)
    manifest = build_manifest(job, settings, params, adapter, model_id)
    manifest["files"] = store.put_sealed(local, relative_dir, ADAPTER_SEAL, manifest)
    results = store_result_files(
        store, job.id, claim.attempt, job.tenant, local.parent / "results", adapter_dir=local, manifest=manifest,
        tokenizer=adapter.loaded.tokenizer, log_history=adapter.log_history,
    )  # fmt: skip
    metrics = adapter.metrics
    trained_tokens = metrics["trained_tokens"]
    result = FineTuneResult(
        fine_tuned_model=model_id,
        trained_tokens=int(trained_tokens) if trained_tokens is not None else None,
        metrics=metrics,
        result_files=[row.id for row in results],  # file ids: GET /v1/files/{id}/content
        adapter_path=relative_dir,
        samples=adapter.samples,
    )
    row = FineTunedModel(
        id=model_id,
        tenant=job.tenant,  # the model belongs to whoever trained it
        job_id=job.id,
        base_model=job.base_model,
        path=relative_dir,
        manifest=manifest,
        created_at=utcnow(),
    )
    try:
        add_event(session, claim, f"New fine-tuned model created: {model_id}", data={"metrics": metrics})
        if not job_states.succeed(session, claim, result, add=[row, *results]):
            raise ClaimLost(claim.job_id)
    except ClaimLost:
        store.unseal(relative_dir, ADAPTER_SEAL)  # this attempt's own folders: nothing else reads or writes them
        store.delete(artifacts.results_key(job.id, claim.attempt))
        raise
    log.info("fine-tune %s succeeded: %s", job.id, model_id)


def build_manifest(
    job: Job, settings: Settings, params: FineTuneParams, adapter: TrainedAdapter, model_id: str
) -> dict[str, Any]:
    """The adapter's manifest: base model and revision, data, hyperparameters, metrics, prompt template."""
    return {
        "fine_tuned_model": model_id,
        "job_id": job.id,
        "base_model": job.base_model,
        "base_model_revision": settings.base_model_revision,
        "base_model_commit": getattr(adapter.loaded.model.config, "_commit_hash", None),
        "parent_model": params.parent_model,  # the fine-tuned model or checkpoint it continued from, if any
        "lineage": adapter.lineage or [job.base_model],  # [parent, its parent, ..., base model]
        "quantization": adapter.hp.quantization,
        "dataset": adapter.data.source,
        "hyperparameters": adapter.hp.model_dump(),
        "seed": adapter.seed,
        "metrics": adapter.metrics,
        "prompt_template": TEMPLATE,
        "chat_template": adapter.chat_template,  # Jinja, rendered with apply_chat_template at serve time
        "response_prefix": RESPONSE_PREFIX,  # the completion starts with it; strip it from generated text
        "eos_token": adapter.loaded.tokenizer.eos_token,
        "versions": _versions(),
        "metadata": params.metadata,
        "created_at": utcnow().isoformat(),
    }


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
