"""Fine-tuning hyperparameters: what clients may send, their defaults, and how "auto" resolves.

The OpenAI fields (n_epochs, batch_size, learning_rate_multiplier) keep their meaning; the rest are
llmq's documented extensions, sent in the same `method.supervised.hyperparameters` object.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from shared.request_fields import Name, RequestModel

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier = 1 means for LoRA
AUTO_EPOCHS = 3
AUTO_BATCH_SIZE = 8
DEFAULT_TARGET_MODULES = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP Conv1D layers


class Hyperparameters(RequestModel):
    """method.supervised.hyperparameters of a fine-tuning request.

    Sizes that an operator may want to raise (n_epochs, batch_size, the step counts) are capped by settings at
    the gateway (max_train_epochs, max_train_batch_size, max_train_steps); the rest here.
    """

    n_epochs: int | Literal["auto"] = Field("auto", description="Passes over the training data; auto = 3.")
    batch_size: int | Literal["auto"] = Field("auto", description="Examples per optimizer step; auto = 8.")
    learning_rate_multiplier: float | Literal["auto"] = Field(
        "auto", description="Multiplies the base LoRA learning rate 2e-4; auto = 1."
    )
    learning_rate: float | None = Field(None, gt=0, le=1, description="Sets the learning rate outright.")
    lora_r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, le=1024, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[Annotated[Name, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=16,
        description="Module names that get LoRA adapters (checked against the base model's modules).",
    )
    quantization: Literal["nf4", "int8", "none"] = Field(
        "nf4", description="How the frozen base is held during training (none = bf16/fp32)."
    )
    max_seq_len: int = Field(512, ge=16, le=8192, description="Tokens per example; longer ones are cut.")
    packing: bool = Field(False, description="Pack several examples into one row (no padding).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of steps with rising learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    eval_every_steps: int | None = Field(None, ge=1, description="Validation loss every N steps (and at the end).")
    save_every_steps: int = Field(50, ge=1, description="A checkpoint every N steps.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    validation_split: float = Field(
        0.1, ge=0, lt=1, description="Share of the training file held out when no validation_file is given."
    )

    @model_validator(mode="after")
    def _positive_sizes(self) -> Hyperparameters:
        for name in ("n_epochs", "batch_size"):
            value = getattr(self, name)
            if value != "auto" and value < 1:
                raise ValueError(f"{name} must be at least 1 or 'auto'")
        if self.learning_rate_multiplier != "auto" and not 0 < self.learning_rate_multiplier <= 100:
            raise ValueError("learning_rate_multiplier must be in (0, 100] or 'auto'")
        return self

    def resolved(self) -> ResolvedHyperparameters:
        """Every value concrete: "auto" replaced by what it means."""
        multiplier = 1.0 if self.learning_rate_multiplier == "auto" else float(self.learning_rate_multiplier)
        values = self.model_dump()
        values.update(
            n_epochs=AUTO_EPOCHS if self.n_epochs == "auto" else self.n_epochs,
            batch_size=AUTO_BATCH_SIZE if self.batch_size == "auto" else self.batch_size,
            learning_rate_multiplier=multiplier,
            learning_rate=self.learning_rate or BASE_LEARNING_RATE * multiplier,
        )
        return ResolvedHyperparameters(**values)


class ResolvedHyperparameters(Hyperparameters):
    """Hyperparameters with nothing left on auto: what the worker trains with."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float


# A hub repository id: owner/name, each part letters, digits, '-', '_' and '.', starting and ending with a
# letter or digit (the hub's own rule). Nothing else reaches datasets.load_dataset, which reads a local folder,
# a file or a URL when given one.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_PATH_SIGNS = ("..", "~", "\\", ":", "//")


def hub_dataset_id_problem(name: str) -> str | None:
    """What keeps name from being a hub dataset id (owner/name), or None when it is one."""
    if name.startswith(("/", ".", "~")) or any(sign in name for sign in _PATH_SIGNS):
        return "is a path or URL, not a hub dataset id (owner/name)"
    if not _HUB_ID.fullmatch(name):
        return "is not a hub dataset id (owner/name: letters, digits, '-', '_' and '.')"
    return None


def _hub_dataset_id(name: str) -> str:
    problem = hub_dataset_id_problem(name)
    if problem is not None:
        raise PydanticCustomError("hub_dataset_id", "{problem}", {"problem": problem})
    return name


HubDatasetId = Annotated[str, AfterValidator(_hub_dataset_id)]


class HubDataset(RequestModel):
    """A training set loaded by the worker with `datasets` instead of an uploaded file.

    Only hub ids the operator offers (settings.allowed_datasets) are accepted, checked at the gateway and again
    at the worker; a name that is a path, or that names a folder on the machine, never is one.
    """

    name: HubDatasetId = Field(
        "tatsu-lab/alpaca", max_length=193, description="Hub dataset id (owner/name) from the offered datasets."
    )
    split: str = Field("train", max_length=64, pattern=r"^[A-Za-z0-9_]+$", description="Split to train on, e.g. train.")
    sample_size: int | None = Field(None, ge=1, description="Take this many records (seeded shuffle).")
