"""The train side: claim a fine-tuning job, QLoRA-train its base model on Alpaca data, record everything.

run_fine_tune reads top to bottom: claim -> data -> base model (4-bit) -> LoRA + TRL SFTTrainer -> validation
loss of the base -> train (a callback checks cancel, renews the lease, writes progress, events and
checkpoints) -> validation loss of the adapter -> greedy sample answers to a few validation prompts (adapter
and base) -> adapter + manifest -> fine-tuned model row + succeeded.

The parts live in modules named for their job: worker/trainer_setup.py (base model and trainer),
worker/progress_callback.py (the Trainer-to-job callback), worker/checkpoints.py (checkpoints sealed into the
artifact store; what to resume from), worker/adapter_publishing.py (adapter, manifest, model row, success),
worker/guarded_writes.py (ClaimLost). Nothing here reads another host's disk: data, checkpoints and the
adapter go through the artifact store; the Trainer's own files live in a local scratch folder.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from shared import job_states
from shared.artifacts import ArtifactStore
from shared.celery_app import enqueue
from shared.db import get_sessionmaker
from shared.fine_tuning import ResolvedHyperparameters
from shared.job_data import ErrorCode, Figures, FineTuneParams, FineTuneResult
from shared.job_states import Claim
from shared.notify import publish_finished
from shared.settings import Settings
from worker.adapter_publishing import TrainedAdapter, publish_adapter
from worker.alpaca_data import DatasetUnavailable, load_training_data
from worker.chat_data import job_chat_template
from worker.checkpoints import fetch_checkpoint, last_sealed_checkpoint, step_of, trained_tokens_at
from worker.guarded_writes import ClaimLost, add_event, renew_lease
from worker.identity import worker_id
from worker.leases import lease_keeper
from worker.parent_models import Parent, ParentUnavailable, fetch_parent
from worker.progress_callback import JobCallback
from worker.sample_generations import sample_generations
from worker.trainer_setup import CountingSFTTrainer, ModelLoadFailed, build_trainer, load_trainable_base

log = logging.getLogger(__name__)


def run_fine_tune(job_id: str, settings: Settings) -> None:
    """Runs one fine-tuning job to a terminal state; a job that is not queued is left alone."""
    with get_sessionmaker()() as session:
        claim = job_states.claim(session, job_id, worker=worker_id(), lease_seconds=settings.lease_seconds)
        if claim is None:
            log.info("fine-tune %s is not queued; nothing to do", job_id)
            return
        log.info("fine-tune %s claimed (attempt %d)", job_id, claim.attempt)
        try:
            # A heartbeat thread keeps the lease through model loading, tokenizing and steps longer
            # than a lease; the callback's renewals between steps are what notice a lost claim.
            with lease_keeper(settings.lease_seconds).holding([claim]):
                _fine_tune(session, claim, settings)
        except ClaimLost:
            log.warning("fine-tune %s: attempt %d lost its claim; stopped", job_id, claim.attempt)
            return
        except Exception as exc:
            log.exception("fine-tune %s failed", job_id)
            session.rollback()
            code, message = _error(exc)
            job_states.add_event(session, claim, message, level="error")
            job_states.fail(session, claim, code, message)
        finally:
            _release_memory()
    publish_finished([job_id])


def _error(exc: Exception) -> tuple[ErrorCode, str]:
    """(code, one-line message) for a failure; the traceback goes to the log, not to the client."""
    if isinstance(exc, DatasetUnavailable):
        code, message = ErrorCode.DATASET_UNAVAILABLE, str(exc)
    elif isinstance(exc, ModelLoadFailed):
        code, message = ErrorCode.MODEL_LOAD_FAILED, str(exc)
    elif isinstance(exc, ParentUnavailable):
        code, message = exc.code, str(exc)
    else:
        code, message = ErrorCode.TRAINING_FAILED, f"training failed: {type(exc).__name__}: {exc}"
    return code, " ".join(message.split())[:1000]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fine_tune(session: Session, claim: Claim, settings: Settings) -> None:
    """Trains the claimed job, then publishes its adapter or ends it cancelled; ClaimLost if taken over."""
    job = claim.job
    started = time.monotonic()
    params = FineTuneParams.model_validate(job.params)
    hp = ResolvedHyperparameters.model_validate(params.hyperparameters)
    seed = params.seed
    add_event(session, claim, f"Fine-tuning job started (attempt {claim.attempt}).")

    data = load_training_data(session, settings, params)
    add_event(
        session,
        claim,
        f"Loaded {len(data.train)} training and {len(data.validation)} validation examples.",
        data={"train_examples": len(data.train), "validation_examples": len(data.validation)},
    )

    loaded = load_trainable_base(job.base_model, settings, hp)
    renew_lease(session, claim, settings)
    add_event(session, claim, f"Loaded base model {job.base_model} ({hp.quantization}) on {loaded.device.type}.")

    # The Trainer writes into a local scratch folder of this host; the callback seals each checkpoint into the
    # store (the attempt's own folder there), and a resume fetches the newest sealed one of any attempt.
    with scratch_folder(settings, job.id) as scratch:
        template = job_chat_template(data.train, loaded.tokenizer, settings.chat_template)
        parent = _parent(session, claim, settings, params, scratch / "parent")
        start = parent.folder if parent is not None else None
        trainer = build_trainer(
            loaded, data, hp, seed, output_dir=scratch / "checkpoints", chat_template=template, init_adapter=start
        )
        callback = JobCallback(session, claim, settings, trainer)
        trainer.add_callback(callback)

        metrics: Figures = {}
        if data.validation:
            metrics["base_val_loss"] = callback.evaluate("base_val_loss", "Validation loss of the base model")
        resume = _resume_point(session, claim, settings, trainer, scratch / "resume")
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        if callback.stop_reason == "claim_lost":
            raise ClaimLost(claim.job_id)
        if callback.stop_reason in ("cancelled", "paused"):
            _finish_stopped(session, claim, callback)
            return
        if callback.stop_reason == "drained":
            _hand_back(session, claim, callback)
            return

        if data.validation:
            metrics["val_loss"] = _final_val_loss(callback)
        metrics.update(
            train_loss=output.training_loss,
            final_train_loss=callback.last_loss,
            trained_tokens=trainer.trained_tokens,
            steps=trainer.state.global_step,
            runtime_seconds=round(time.monotonic() - started, 3),
            train_tokens_per_second=callback.tokens_per_second(),
        )
        samples = sample_generations(
            trainer.model, loaded.tokenizer, data.validation, template, count=settings.fine_tune_samples,
            max_tokens=settings.fine_tune_sample_tokens, max_prompt_tokens=hp.max_seq_len,
        )  # fmt: skip
        if samples:
            add_event(session, claim, f"Answered {len(samples)} validation prompts greedily (fine-tuned and base).")
        chain = parent.lineage if parent is not None else [job.base_model]
        adapter = TrainedAdapter(
            trainer.model,
            loaded,
            data,
            hp,
            seed,
            metrics,
            chat_template=template,
            log_history=list(trainer.state.log_history),
            lineage=chain,
            samples=samples,
        )
        publish_adapter(session, claim, settings, adapter, scratch / "adapter")


def _hand_back(session: Session, claim: Claim, callback: JobCallback) -> None:
    """The worker is stopping: the job goes back to the queue at once, to resume from the checkpoint just saved."""
    step = callback.trainer.state.global_step
    job_states.add_event(session, claim, f"Worker stopping: job handed back at step {step} (checkpoint saved).")
    if not job_states.hand_back(session, claim):
        raise ClaimLost(claim.job_id)
    enqueue("train", claim.job_id)
    log.info("fine-tune %s handed back at step %d", claim.job_id, step)


@contextmanager
def scratch_folder(settings: Settings, job_id: str) -> Iterator[Path]:
    """A new local folder for one attempt's training run (checkpoints as the Trainer writes them, a fetched
    resume point, the adapter before upload), removed afterwards. A host that dies leaves it behind; the
    store, not this folder, is what another host resumes from."""
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=settings.scratch_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parent(session: Session, claim: Claim, settings: Settings, params: FineTuneParams, into: Path) -> Parent | None:
    """The adapter a continued fine-tune starts from, fetched (None for a new adapter); ParentUnavailable."""
    if params.parent_model is None:
        return None
    parent = fetch_parent(session, ArtifactStore.from_settings(settings), claim.job, params.parent_model, into)
    add_event(session, claim, f"Continuing from {parent.model_id}.", data={"lineage": parent.lineage})
    return parent


def _resume_point(
    session: Session, claim: Claim, settings: Settings, trainer: CountingSFTTrainer, into: Path
) -> Path | None:
    """The newest sealed checkpoint of any attempt, fetched from the store into a local folder (its token
    count set on the trainer), or None."""
    store = ArtifactStore.from_settings(settings)
    key = last_sealed_checkpoint(store, claim.job.id)
    if key is None:
        return None
    resume = fetch_checkpoint(store, key, into)
    trainer.trained_tokens = trained_tokens_at(resume)
    add_event(session, claim, f"Resuming from the checkpoint at step {step_of(key)}.")
    return resume


def _final_val_loss(callback: JobCallback) -> float:
    """The adapter's validation loss: the one evaluated at the last step, else a new evaluation."""
    if callback.val_loss_step == callback.trainer.state.global_step and callback.val_loss is not None:
        return callback.val_loss
    return callback.evaluate("val_loss", "Validation loss of the fine-tuned model")


def _finish_stopped(session: Session, claim: Claim, callback: JobCallback) -> None:
    """Ends a fine-tune stopped at a checkpoint: cancelled (final) or paused (resumed later from it)."""
    step = callback.trainer.state.global_step
    result = FineTuneResult(
        trained_tokens=callback.trainer.trained_tokens,
        step=step,
        total_steps=callback.trainer.state.max_steps,
        checkpoint=callback.last_checkpoint,
    )
    how = callback.stop_reason
    job_states.add_event(session, claim, f"Fine-tuning {how} at step {step}.")
    finish = job_states.finish_paused if how == "paused" else job_states.finish_cancelled
    if not finish(session, claim, result):
        raise ClaimLost(claim.job_id)
    log.info("fine-tune %s %s at step %d", claim.job_id, how, step)
