"""The Trainer-to-job callback: a running Trainer's cancel checks, heartbeats, progress, events and checkpoints.

Every write is guarded by the claim (shared.job_states answers False once another attempt owns the job);
inside the training loop a failed write cannot raise through the Trainer, so it stops training instead and
stop_reason says why. The job runner reads stop_reason after train() returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from shared import job_states
from shared.artifacts import CHECKPOINT_SEAL, ArtifactStore
from shared.job_data import CheckpointNote, Figures, FineTuneResult
from shared.job_states import Claim
from shared.models import utcnow
from shared.settings import Settings
from worker import drain, metrics
from worker.checkpoints import drop_rotated, is_complete, store_checkpoint
from worker.guarded_writes import add_event
from worker.trainer_setup import CountingSFTTrainer

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 2.0  # least time between two progress writes (the last step is always written)
HEARTBEAT_EVERY_SECONDS = 5.0  # least time between two lease renewals (never more than a quarter lease)


@dataclass
class _Window:
    """Train losses since the last progress write."""

    losses: list[float] = field(default_factory=list)

    def take_mean(self) -> float | None:
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses.clear()
        return mean


def stop_with_checkpoint(control: TrainerControl) -> None:
    """Ends training at the end of the current step with a checkpoint (the Trainer saves, then stops).

    The one way a fine-tune stops early and keeps its work: a cancel, a pause, a worker's graceful drain.
    The checkpoint holds the LoRA weights, optimizer, scheduler, RNG state and step (hence the data position),
    so a later attempt on any train worker resumes from it exactly (fine_tune._resume_point).
    """
    control.should_training_stop = True
    control.should_save = True


class JobCallback(TrainerCallback):
    """Connects a running Trainer to the job row: cancel, heartbeat, progress, events and checkpoints.

    Every write is guarded by the claim; when one fails (the job was taken over) training stops and
    stop_reason says why. A requested cancel or pause stops training at the end of the current step, with a
    checkpoint.
    """

    def __init__(self, session: Session, claim: Claim, settings: Settings, trainer: CountingSFTTrainer) -> None:
        self.session = session
        self.claim = claim
        self.settings = settings
        self.store = ArtifactStore.from_settings(settings)
        self.trainer = trainer
        self.lease_seconds = settings.lease_seconds
        self.heartbeat_every = min(HEARTBEAT_EVERY_SECONDS, settings.lease_seconds / 4)
        self.stop_reason: str | None = None  # None | "cancelled" | "paused" | "drained" | "claim_lost"
        self.in_training = False
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.val_loss_step: int | None = None
        self.last_checkpoint: CheckpointNote | None = None
        self._window = _Window()
        self._last_heartbeat = time.monotonic()
        self._last_progress = 0.0
        self._train_started = time.monotonic()
        self._train_ended: float | None = None
        self._start_step = 0
        self._start_tokens = 0
        self._counted = (0, 0)  # step and trained tokens already added to this worker's counters

    # -- guarded writes ---------------------------------------------------------------------------------

    def _lost(self, control: TrainerControl) -> None:
        self.stop_reason = "claim_lost"
        control.should_training_stop = True
        control.should_save = False

    def _heartbeat(self, control: TrainerControl, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_every:
            return True
        self._last_heartbeat = now
        if not job_states.renew_lease(self.session, self.claim, self.lease_seconds):
            self._lost(control)
            return False
        return True

    def _write(self, ok: bool, control: TrainerControl) -> None:
        if not ok:
            self._lost(control)

    def _stored(self, key: str) -> bool:
        """Whether a recorded checkpoint is still sealed in the store (rotated-out ones are removed)."""
        return self.store.is_sealed(key, CHECKPOINT_SEAL)

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
        add_event(self.session, self.claim, f"{label}: {loss:.4f}", type="metrics", data={"step": step, key: loss})
        return loss

    # -- Trainer events -------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        self.in_training = True
        self._train_started = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = self.trainer.trained_tokens
        self._counted = (state.global_step, self.trainer.trained_tokens)  # a resumed run counts only its own
        self._write(
            job_states.add_event(
                self.session,
                self.claim,
                f"Training for {state.max_steps} steps.",
                data={"total_steps": state.max_steps, "start_step": state.global_step},
            ),
            control,
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        self.in_training = False
        self._train_ended = time.monotonic()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        if not self._heartbeat(control):
            return
        request = job_states.stop_request(self.session, self.claim)
        if request == "pause":
            self.stop_reason = "paused"
            stop_with_checkpoint(control)
        elif request == "cancel":
            # Also asked when the claim is gone; a lease renewal tells the two apart.
            if not self._heartbeat(control, force=True):
                return
            self.stop_reason = "cancelled"
            stop_with_checkpoint(control)  # keep the work done so far as a checkpoint
        elif drain.requested() and self.stop_reason is None:
            self.stop_reason = "drained"  # SIGTERM: the job goes back to the queue from this step
            stop_with_checkpoint(control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: object,
    ) -> None:
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
        metrics.training_logged(step - self._counted[0], tokens - self._counted[1])
        self._counted = (step, tokens)
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
        finish = utcnow() + timedelta(seconds=eta) if eta is not None else None
        progress = FineTuneResult(
            trained_tokens=tokens, step=step, total_steps=total, train_loss=train_loss, estimated_finish=finish
        )
        self._write(job_states.record_progress(self.session, self.claim, progress), control)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        self._heartbeat(control)  # an evaluation can take longer than a lease

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: object,
    ) -> None:
        if not self.in_training or metrics is None or "eval_loss" not in metrics:
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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        if self.stop_reason == "claim_lost":
            return
        # Called after the Trainer wrote the whole checkpoint locally (trainer_state.json last) and rotated old
        # ones: copy it into the store and seal it, then mirror the rotation there.
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not is_complete(folder):
            log.warning("checkpoint %s is incomplete; not recorded", folder)
            return
        path = store_checkpoint(self.store, folder, self.claim.job_id, self.claim.attempt)
        drop_rotated(self.store, self.claim.job_id, self.claim.attempt, Path(str(args.output_dir)))
        metrics: Figures = {
            "step": state.global_step,
            "train_loss": self.last_loss,
            "trained_tokens": self.trainer.trained_tokens,
        }
        if self.val_loss_step == state.global_step:
            metrics["val_loss"] = self.val_loss
        self.last_checkpoint = CheckpointNote(step=state.global_step, path=path, metrics=metrics)
        recorded = job_states.add_checkpoint(
            self.session, self.claim, state.global_step, path, metrics, on_disk=self._stored
        )
        self._write(recorded, control)
        if self.stop_reason is None:
            self._write(
                job_states.add_event(
                    self.session, self.claim, f"Checkpoint saved at step {state.global_step}.", data=metrics
                ),
                control,
            )
