"""The train side: claim a fine-tuning job, QLoRA-train its base model on Alpaca data, record everything.

run_fine_tune reads top to bottom: claim -> data -> base model (4-bit) -> LoRA + TRL SFTTrainer -> validation
loss of the base -> train (a callback checks cancel, renews the lease, writes progress, events and
checkpoints) -> validation loss of the adapter -> adapter + manifest -> fine-tuned model row + succeeded.

Loss is on the response only: TRL's prompt/completion examples mask the prompt, append EOS to the completion
and learn it; padding is masked by position (the collator pads labels with -100), never by token id, since
GPT-2's pad token is its EOS. Trained tokens are those labels: response tokens that are not padding.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, disable_progress_bars
from peft import LoraConfig, prepare_model_for_kbit_training
from sqlalchemy.orm import Session
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from shared import artifacts, job_states
from shared.db import get_sessionmaker
from shared.fine_tuning import ResolvedHyperparameters
from shared.job_states import Claim
from shared.models import FineTunedModel, Job, utcnow
from shared.notify import publish_finished
from shared.prompts import TEMPLATE
from shared.settings import Quantization, Settings
from worker.alpaca_data import RESPONSE_PREFIX, DatasetUnavailable, TrainingData, load_training_data, to_examples
from worker.leases import lease_keeper
from worker.model_loading import LoadedModel, compute_dtype, load_base_model, pick_device

log = logging.getLogger(__name__)

SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk per job; older ones are deleted as new ones are written
PROGRESS_EVERY_SECONDS = 2.0  # least time between two progress writes (the last step is always written)
HEARTBEAT_EVERY_SECONDS = 5.0  # least time between two lease renewals (never more than a quarter lease)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint folder: its presence means complete


class ModelLoadFailed(Exception):
    """The base model or its tokenizer could not be loaded."""


class ClaimLost(Exception):
    """Another attempt owns the job now (the lease expired); this worker must stop writing to it."""


def worker_id() -> str:
    """host:pid of this process (read per call: Celery forks workers after import)."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


def _error(exc: Exception) -> tuple[str, str]:
    """(code, one-line message) for a failure; the traceback goes to the log, not to the client."""
    if isinstance(exc, DatasetUnavailable):
        code, message = "dataset_unavailable", str(exc)
    elif isinstance(exc, ModelLoadFailed):
        code, message = "model_load_failed", str(exc)
    else:
        code, message = "training_failed", f"training failed: {type(exc).__name__}: {exc}"
    return code, " ".join(message.split())[:1000]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The job, top to bottom
# ----------------------------------------------------------------------------------------------------------


def _fine_tune(session: Session, claim: Claim, settings: Settings) -> None:
    job = claim.job
    started = time.monotonic()
    hp = ResolvedHyperparameters.model_validate(job.params["hyperparameters"])
    seed = int(job.params.get("seed") or 0)
    _event(session, claim, f"Fine-tuning job started (attempt {claim.attempt}).")

    data = load_training_data(session, settings, job.params)
    _event(
        session,
        claim,
        f"Loaded {len(data.train)} training and {len(data.validation)} validation examples.",
        data={"train_examples": len(data.train), "validation_examples": len(data.validation)},
    )

    loaded = _load_model(job.base_model, settings, hp)
    _renew(session, claim, settings)
    _event(session, claim, f"Loaded base model {job.base_model} ({hp.quantization}) on {loaded.device.type}.")

    # Each attempt writes its own checkpoints; it resumes from the newest complete one of any attempt.
    output_dir = artifacts.resolve(settings, artifacts.checkpoints_dir(job.id, claim.attempt))
    trainer = build_trainer(loaded, data, hp, seed, output_dir=output_dir)
    callback = JobCallback(session, claim, settings, trainer)
    trainer.add_callback(callback)

    metrics: dict[str, Any] = {}
    if data.validation:
        metrics["base_val_loss"] = callback.evaluate("base_val_loss", "Validation loss of the base model")

    resume = last_complete_checkpoint(artifacts.resolve(settings, artifacts.job_dir(job.id)))
    if resume is not None:
        trainer.trained_tokens = _trained_tokens_at(resume)
        _event(session, claim, f"Resuming from the checkpoint at step {_step_of(resume)}.")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if callback.stop_reason == "claim_lost":
        raise ClaimLost(claim.job_id)
    if callback.stop_reason == "cancelled":
        _finish_cancelled(session, claim, callback)
        return

    if data.validation:
        if callback.val_loss_step == trainer.state.global_step and callback.val_loss is not None:
            metrics["val_loss"] = callback.val_loss
        else:
            metrics["val_loss"] = callback.evaluate("val_loss", "Validation loss of the fine-tuned model")
    metrics.update(
        train_loss=output.training_loss,
        final_train_loss=callback.last_loss,
        trained_tokens=trainer.trained_tokens,
        steps=trainer.state.global_step,
        runtime_seconds=round(time.monotonic() - started, 3),
        train_tokens_per_second=callback.tokens_per_second(),
    )
    _succeed(session, claim, settings, trainer, loaded, data, hp, seed, metrics)


def _load_model(name: str, settings: Settings, hp: ResolvedHyperparameters) -> LoadedModel:
    device = pick_device(settings.device)
    quantization = load_quantization(hp.quantization, device)
    try:
        loaded = load_base_model(name, settings.base_model_revision, quantization, settings.device)
    except Exception as exc:
        log.exception("loading %s failed", name)
        message = " ".join(str(exc).split())[:500]
        raise ModelLoadFailed(f"could not load base model {name!r}: {type(exc).__name__}: {message}") from exc
    keep_4bit_trainable(loaded.model)
    return loaded


def load_quantization(quantization: str, device: torch.device) -> Quantization:
    """How to load the frozen base: nf4/int8 as asked; "none" = bf16 where native, else fp32."""
    if quantization in ("nf4", "int8"):
        return "nf4" if quantization == "nf4" else "int8"
    return "bf16" if compute_dtype(device) == torch.bfloat16 else "fp32"


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Turns off bitsandbytes' CPU inference repack on every Linear4bit; returns how many it changed.

    On a CPU with AVX512-BF16 the first no-grad forward of a Linear4bit repacks its weight into an
    inference-only layout, after which QLoRA training fails ("a view of a leaf Variable that requires grad
    is being used in an in-place operation"). Must run before any forward, including the base evaluation.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  (a bitsandbytes attribute)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


def build_trainer(
    loaded: LoadedModel, data: TrainingData, hp: ResolvedHyperparameters, seed: int, *, output_dir: Path
) -> Any:
    """A TRL SFTTrainer for LoRA on the loaded base with completion-only loss, ready to train()."""
    disable_progress_bars()
    model = loaded.model
    if loaded.quantization in ("nf4", "int8"):
        # Freezes the base, upcasts its unquantized weights (embeddings, layer norms) to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"  # training pads on the right; the collator masks padding by position

    max_length = min(hp.max_seq_len, loaded.context_length)
    train_examples = to_examples(data.train)
    eval_dataset = Dataset.from_list(to_examples(data.validation)) if data.validation else None
    rows = packed_rows(tokenizer, train_examples, hp.batch_size, max_length) if hp.packing else hp.batch_size
    bf16, fp16 = mixed_precision(loaded.device)
    args = SFTConfig(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        # Optimisation
        num_train_epochs=hp.n_epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=rows,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=min(hp.warmup_ratio, 0.999),  # transformers 5: a float below 1 is a share of the steps
        # Data: prompt/completion pairs -> loss on the completion (+ EOS) only
        max_length=max_length,
        packing=hp.packing,
        completion_only_loss=True,
        # Unpacked batches are padded to their longest example; drawing them from length-sorted megabatches
        # (50 batches, shuffled) cut padding from about 45% to 4% on Alpaca-like lengths (bench/train.py).
        train_sampling_strategy="random" if hp.packing else "group_by_length",
        # Speed: GPT-2 on these lengths fits in memory; recomputing activations would cost about 20-30%.
        activation_checkpointing=False,
        bf16=bf16,
        fp16=fp16,
        use_cpu=loaded.device.type == "cpu",
        # Bookkeeping: every step is logged (the callback thins what reaches the database)
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if hp.eval_every_steps and eval_dataset is not None else "no",
        eval_steps=hp.eval_every_steps,
        save_strategy="steps",
        save_steps=hp.save_every_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights (in, out); bitsandbytes layers ignore it
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # TRL casts the LoRA weights of a quantized base to bf16 (the QLoRA paper's GPU recipe). bf16 resolves
    # about 1/256 of a weight, the size of an Adam step at lr 2e-4 on weights of about 0.05, so updates
    # would partly round away. fp32 adapters are peft's own default, a small share of the parameters, still
    # computed in bf16 under autocast, and keep resume exact (the cast is not reapplied on resume).
    assert trainer.model is not None
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


def packed_rows(tokenizer: Any, examples: list[dict[str, str]], batch_size: int, max_length: int) -> int:
    """Packed rows per step that hold about batch_size examples, so batch_size keeps its meaning.

    TRL's batch is rows; a packed row of max_length tokens holds several examples, and padding-free
    packing runs a step's rows as one sequence whose attention (without FlashAttention's varlen kernels,
    e.g. on CPU) costs the square of its length: 8 rows of 512 tokens ran out of 20 GB on GPT-2.
    """
    sample = examples[:: max(1, len(examples) // 1000)]  # the mean of about 1000 is plenty
    lengths = [len(tokenizer(e["prompt"] + e["completion"])["input_ids"]) + 1 for e in sample]
    mean = sum(min(n, max_length) for n in lengths) / max(1, len(lengths))
    return max(1, round(batch_size * mean / max_length))


def mixed_precision(device: torch.device) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags for the Trainer: bf16 where native (CPU with AVX512-BF16, recent GPUs)."""
    dtype = compute_dtype(device)
    return dtype == torch.bfloat16, dtype == torch.float16


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that counts trained tokens: labels that are not -100 (response tokens, not padding)."""

    trained_tokens: int = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        # Labels are -100 on prompt tokens, padding and the first token of each packed sequence.
        self.trained_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # kept in trainer_state.json, so a resumed attempt continues the count
            logs["trained_tokens"] = self.trained_tokens
        super().log(logs, start_time)


def last_complete_checkpoint(job_folder: Path) -> Path | None:
    """The newest checkpoint of any attempt (attempt-<n>/checkpoints/checkpoint-<step> under the job's folder)
    that holds trainer_state.json (written last), or None."""
    found = job_folder.glob("attempt-*/checkpoints/checkpoint-*")
    complete = [p for p in found if p.name[11:].isdigit() and (p / TRAINER_STATE).is_file()]
    return max(complete, key=_step_of, default=None)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _trained_tokens_at(checkpoint: Path) -> int:
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    counts = [entry["trained_tokens"] for entry in state.get("log_history", []) if "trained_tokens" in entry]
    return int(counts[-1]) if counts else 0


# ----------------------------------------------------------------------------------------------------------
# The callback: cancel, heartbeat, progress, evaluation and checkpoints
# ----------------------------------------------------------------------------------------------------------


def _event(
    session: Session, claim: Claim, message: str, *, type: str = "message", data: dict[str, Any] | None = None
) -> None:
    if not job_states.add_event(session, claim, message, type=type, data=data):
        raise ClaimLost(claim.job_id)


def _renew(session: Session, claim: Claim, settings: Settings) -> None:
    if not job_states.renew_lease(session, claim, settings.lease_seconds):
        raise ClaimLost(claim.job_id)


@dataclass
class _Window:
    """Train losses since the last progress write."""

    losses: list[float] = field(default_factory=list)

    def take_mean(self) -> float | None:
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses.clear()
        return mean


class JobCallback(TrainerCallback):
    """Connects a running Trainer to the job row: cancel, heartbeat, progress, events and checkpoints.

    Every write is guarded by the claim; when one fails (the job was taken over) training stops and
    stop_reason says why. A requested cancel stops training at the end of the current step, with a
    checkpoint.
    """

    def __init__(self, session: Session, claim: Claim, settings: Settings, trainer: Any) -> None:
        self.session = session
        self.claim = claim
        self.settings = settings
        self.trainer = trainer
        self.lease_seconds = settings.lease_seconds
        self.heartbeat_every = min(HEARTBEAT_EVERY_SECONDS, settings.lease_seconds / 4)
        self.stop_reason: str | None = None  # None | "cancelled" | "claim_lost"
        self.in_training = False
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.val_loss_step: int | None = None
        self.last_checkpoint: dict[str, Any] | None = None
        self._window = _Window()
        self._last_heartbeat = time.monotonic()
        self._last_progress = 0.0
        self._train_started = time.monotonic()
        self._train_ended: float | None = None
        self._start_step = 0
        self._start_tokens = 0

    # -- guarded writes ---------------------------------------------------------------------------------

    def _lost(self, control: Any) -> None:
        self.stop_reason = "claim_lost"
        control.should_training_stop = True
        control.should_save = False

    def _heartbeat(self, control: Any, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_every:
            return True
        self._last_heartbeat = now
        if not job_states.renew_lease(self.session, self.claim, self.lease_seconds):
            self._lost(control)
            return False
        return True

    def _write(self, ok: bool, control: Any) -> None:
        if not ok:
            self._lost(control)

    def _on_disk(self, path: str) -> bool:
        """Whether a recorded checkpoint's folder is still there (save_total_limit deletes older ones)."""
        return artifacts.resolve(self.settings, path).is_dir()

    # -- rates --------------------------------------------------------------------------------------------

    def tokens_per_second(self) -> float:
        """Trained tokens per second in this attempt's training loop (so far, or until it ended)."""
        elapsed = (self._train_ended or time.monotonic()) - self._train_started
        return round((self.trainer.trained_tokens - self._start_tokens) / elapsed, 1) if elapsed > 0 else 0.0

    def _eta_seconds(self, step: int, total: int) -> float | None:
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._train_started) / done * max(total - step, 0)

    # -- evaluation outside the training loop -------------------------------------------------------------

    def evaluate(self, key: str, label: str) -> float:
        """Validation loss of the model as it stands, written as an event; raises ClaimLost if lost."""
        loss = float(self.trainer.evaluate()["eval_loss"])
        step = self.trainer.state.global_step
        _event(self.session, self.claim, f"{label}: {loss:.4f}", type="metrics", data={"step": step, key: loss})
        return loss

    # -- Trainer events -------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.in_training = True
        self._train_started = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = self.trainer.trained_tokens
        self._write(
            job_states.add_event(
                self.session,
                self.claim,
                f"Training for {state.max_steps} steps.",
                data={"total_steps": state.max_steps, "start_step": state.global_step},
            ),
            control,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.in_training = False
        self._train_ended = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._heartbeat(control):
            return
        if job_states.cancel_requested(self.session, self.claim):
            # Also true when the claim is gone; a lease renewal tells the two apart.
            if not self._heartbeat(control, force=True):
                return
            self.stop_reason = "cancelled"
            control.should_training_stop = True
            control.should_save = True  # keep the work done so far as a checkpoint

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or self.stop_reason == "claim_lost":
            return
        self.last_loss = float(logs["loss"])
        self._window.losses.append(self.last_loss)
        now = time.monotonic()
        last = state.global_step >= state.max_steps or self.stop_reason is not None
        if not last and now - self._last_progress < PROGRESS_EVERY_SECONDS:
            return
        self._last_progress = now
        step, total = state.global_step, state.max_steps
        train_loss = self._window.take_mean()
        eta = self._eta_seconds(step, total)
        tokens = self.trainer.trained_tokens
        figures = {
            "step": step,
            "total_steps": total,
            "train_loss": train_loss,
            "learning_rate": logs.get("learning_rate"),
            "trained_tokens": tokens,
            "tokens_per_second": self.tokens_per_second(),
            "eta_seconds": round(eta, 1) if eta is not None else None,
        }
        message = f"Step {step}/{total}: training loss={train_loss:.4f}"
        self._write(job_states.add_event(self.session, self.claim, message, type="metrics", data=figures), control)
        finish = (utcnow() + timedelta(seconds=eta)).isoformat() if eta is not None else None
        progress = {
            "trained_tokens": tokens,
            "step": step,
            "total_steps": total,
            "train_loss": train_loss,
            "estimated_finish": finish,
        }
        self._write(job_states.record_progress(self.session, self.claim, progress), control)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._heartbeat(control)  # an evaluation can take longer than a lease

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics") or {}
        if not self.in_training or "eval_loss" not in metrics:
            return  # evaluations before and after training are written by evaluate()
        self.val_loss, self.val_loss_step = float(metrics["eval_loss"]), state.global_step
        self._write(
            job_states.add_event(
                self.session,
                self.claim,
                f"Step {state.global_step}: validation loss={self.val_loss:.4f}",
                type="metrics",
                data={"step": state.global_step, "val_loss": self.val_loss},
            ),
            control,
        )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_reason == "claim_lost":
            return
        # Called after the Trainer wrote the whole checkpoint (trainer_state.json last) and rotated old ones.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (folder / TRAINER_STATE).is_file():
            log.warning("checkpoint %s is incomplete; not recorded", folder)
            return
        metrics: dict[str, Any] = {
            "step": state.global_step,
            "train_loss": self.last_loss,
            "trained_tokens": self.trainer.trained_tokens,
        }
        if self.val_loss_step == state.global_step:
            metrics["val_loss"] = self.val_loss
        path = artifacts.relative(self.settings, folder)
        self.last_checkpoint = {"step": state.global_step, "path": path, "metrics": metrics}
        recorded = job_states.add_checkpoint(
            self.session, self.claim, state.global_step, path, metrics, on_disk=self._on_disk
        )
        self._write(recorded, control)
        if self.stop_reason is None:
            self._write(
                job_states.add_event(
                    self.session, self.claim, f"Checkpoint saved at step {state.global_step}.", data=metrics
                ),
                control,
            )


# ----------------------------------------------------------------------------------------------------------
# Endings
# ----------------------------------------------------------------------------------------------------------


def _finish_cancelled(session: Session, claim: Claim, callback: JobCallback) -> None:
    step = callback.trainer.state.global_step
    result = {
        "trained_tokens": callback.trainer.trained_tokens,
        "step": step,
        "total_steps": callback.trainer.state.max_steps,
        "checkpoint": callback.last_checkpoint,
    }
    job_states.add_event(session, claim, f"Fine-tuning cancelled at step {step}.")
    if not job_states.finish_cancelled(session, claim, result):
        raise ClaimLost(claim.job_id)
    log.info("fine-tune %s cancelled at step %d", claim.job_id, step)


def fine_tuned_model_id(base_model: str, suffix: str | None, job_id: str) -> str:
    """ft:<base short name>:<suffix or llmq>:<job id>; the short name is the model id's last path part."""
    short = base_model.rstrip("/").rsplit("/", 1)[-1] or base_model
    return f"ft:{short}:{suffix or 'llmq'}:{job_id}"


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


def _succeed(
    session: Session,
    claim: Claim,
    settings: Settings,
    trainer: Any,
    loaded: LoadedModel,
    data: TrainingData,
    hp: ResolvedHyperparameters,
    seed: int,
    metrics: dict[str, Any],
) -> None:
    job: Job = claim.job
    model_id = fine_tuned_model_id(job.base_model, job.params.get("suffix"), job.id)
    relative_dir = artifacts.adapter_dir(job.id, claim.attempt)
    manifest = {
        "fine_tuned_model": model_id,
        "job_id": job.id,
        "base_model": job.base_model,
        "base_model_revision": settings.base_model_revision,
        "base_model_commit": getattr(loaded.model.config, "_commit_hash", None),
        "quantization": hp.quantization,
        "dataset": data.source,
        "hyperparameters": hp.model_dump(),
        "seed": seed,
        "metrics": metrics,
        "prompt_template": TEMPLATE,
        "response_prefix": RESPONSE_PREFIX,  # the completion starts with it; strip it from generated text
        "eos_token": loaded.tokenizer.eos_token,
        "versions": _versions(),
        "metadata": job.params.get("metadata"),
        "created_at": utcnow().isoformat(),
    }
    folder = artifacts.resolve(settings, relative_dir)
    files = save_adapter(trainer.model, folder, manifest)
    result_files = [f"{relative_dir}/{name}" for name in files]
    result = {
        "fine_tuned_model": model_id,
        "trained_tokens": metrics["trained_tokens"],
        "metrics": metrics,
        "result_files": result_files,
        "adapter_path": relative_dir,
    }
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
        _event(session, claim, f"New fine-tuned model created: {model_id}", data={"metrics": metrics})
        if not job_states.succeed(session, claim, result, add=[row]):
            raise ClaimLost(claim.job_id)
    except ClaimLost:
        shutil.rmtree(folder, ignore_errors=True)  # this attempt's own folder: nothing else reads or writes it
        raise
    log.info("fine-tune %s succeeded: %s", job.id, model_id)


def save_adapter(model: Any, folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Writes the LoRA weights (safetensors), their config and manifest.json into folder; the file names.

    Written into a sibling temporary folder first and moved into place, so a folder that exists is complete.
    The folder is the attempt's own (artifacts.adapter_dir), so it does not exist yet.
    """
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder)
    return sorted(p.name for p in folder.iterdir() if p.is_file())
