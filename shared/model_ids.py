"""Fine-tuned model and checkpoint ids, and reading them back.

    ft:<base short name>:<suffix or llmq>:<job id>                    a fine-tune's model (its adapter)
    ft:<base short name>:<suffix or llmq>:<job id>:ckpt-step-<n>      one of its checkpoints, servable too

The base's short name is its id's last path part. The job id is always the last part before the checkpoint
mark, so the gateway and the workers find the job (and with it the tenant) from the id alone.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_MARK = ":ckpt-step-"


def fine_tuned_model_id(base_model: str, suffix: str | None, job_id: str) -> str:
    """ft:<base short name>:<suffix or llmq>:<job id>."""
    short = base_model.rstrip("/").rsplit("/", 1)[-1] or base_model
    return f"ft:{short}:{suffix or 'llmq'}:{job_id}"


def checkpoint_model_id(model_id: str, step: int) -> str:
    """The id of a fine-tune's checkpoint at a step: its model id + :ckpt-step-<n>."""
    return f"{model_id}{CHECKPOINT_MARK}{step}"


@dataclass(frozen=True)
class CheckpointRef:
    """What a checkpoint's model id names: the fine-tune's model id, its job, the step."""

    model_id: str
    job_id: str
    step: int


def parse_checkpoint_id(model: str) -> CheckpointRef | None:
    """The fine-tune and step a checkpoint model id names; None for any other id."""
    head, mark, step = model.rpartition(CHECKPOINT_MARK)
    if not mark or not head.startswith("ft:") or not step.isdigit() or head.count(":") < 3:
        return None
    return CheckpointRef(model_id=head, job_id=head.rsplit(":", 1)[1], step=int(step))


def job_of(model: str) -> str | None:
    """The job id a fine-tuned model or checkpoint id names (the part after its last colon); None otherwise."""
    ref = parse_checkpoint_id(model)
    if ref is not None:
        return ref.job_id
    return model.rsplit(":", 1)[1] if model.startswith("ft:") and model.count(":") >= 3 else None
