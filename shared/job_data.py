"""What a job row's JSON columns hold, typed: the one contract between the gateway and the workers.

    params  GenerationParams (kind generate)  written by the routes, read by the generate worker and the views
            FineTuneParams   (kind train)     written by the fine-tuning route, read by the train worker and views
            ExportParams     (kind export)    written by the export route, read by the train worker and views
    result  GenerationResult (kind generate)  written by the generate worker when a job succeeds
            FineTuneResult   (kind train)     progress while the job runs, where a cancel stopped it, the model
                                              and its metrics once it succeeded
            ExportResult     (kind export)    the exported model's file once the export succeeded
    error   JobError                          written by a worker (or the reaper) when a job fails; its code is
                                              an ErrorCode, which the completions route maps to HTTP

Every writer builds one of these models and shared.job_states stores its JSON; every reader validates the
stored JSON with the same model. Reading is tolerant, so rows written before a field existed stay readable:
unknown keys are ignored and a key an older writer did not write takes its default (a generation's sampling
settings default to what a request that left them out asked for). A row that still does not validate is of
the wrong shape: a list leaves it out (gateway.views.readable) and the worker fails that job alone.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

# What a generation request that leaves a sampling setting out asks for (shared.schemas uses the same values).
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


JobKind = Literal["generate", "train", "export"]  # jobs.kind (exports run on the train queue)


class StoredData(BaseModel):
    """Base of what a job row stores: keys this version does not know are ignored on reading."""

    model_config = ConfigDict(extra="ignore")


class ErrorCode(StrEnum):
    """Why a job failed: written by the workers and the reaper, read by the gateway (never free text)."""

    MODEL_LOAD_FAILED = "model_load_failed"  # the base model could not be loaded
    ADAPTER_LOAD_FAILED = "adapter_load_failed"  # a fine-tuned model's adapter could not be loaded
    MODEL_NOT_FOUND = "model_not_found"  # the job names a model the worker cannot find
    MODEL_DELETED = "model_deleted"  # the job names a fine-tuned model its owner deleted after the job was queued
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt + max_tokens do not fit the model
    PREPARATION_FAILED = "preparation_failed"  # the job's row could not be turned into requests
    GENERATION_FAILED = "generation_failed"  # decoding the job failed
    RESULT_NOT_STORABLE = "result_not_storable"  # the database refused the job's result
    DATASET_UNAVAILABLE = "dataset_unavailable"  # the training or validation data could not be loaded
    TRAINING_FAILED = "training_failed"  # anything else that stopped a fine-tune
    EXPORT_FAILED = "export_failed"  # merging or packaging an exported model failed
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"  # the job's worker stopped answering on every attempt


class JobError(StoredData):
    """A failed job's error: a stable code and a one-line message for people."""

    code: ErrorCode
    message: str


# --- Generation jobs --------------------------------------------------------------------------------------


class ChatTurn(StoredData):
    """One message of a conversation a generation job renders with a chat template (shared.chat_templates)."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(StoredData):
    """What a generation job runs: its prompts and one set of sampling settings.

    A chat job (and a completion with template "model") carries conversations instead: the worker renders
    conversation i with the model's chat template (tokenizer.apply_chat_template) as prompt i; prompts then
    hold each conversation's text, which sizes batches and is shown.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: list[str] | None = None
    seed: int | None = None
    n: int = 1  # outputs per prompt: output i*n+j is choice j of prompt i
    prompts: list[str]
    stream: bool = False  # /v1/completions with stream: the worker publishes text deltas
    user: str | None = None  # /v1/completions' user: stored, never used
    conversations: list[list[ChatTurn]] | None = None  # rendered by the worker into prompts (see above)
    chat_template: str | None = None  # the Jinja template to render them with; None: the base model's
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest alternatives
    metadata: dict[str, str] | None = None  # /v1/chat/completions' metadata: stored, never used


class TopLogprob(StoredData):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(StoredData):
    """A generated token's log probability under the model (before temperature and top-p), and the likeliest
    tokens at its position."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class GenerationOutput(StoredData):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # when the job asked for them: one per token of text


class Usage(StoredData):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationResult(StoredData):
    """A succeeded generation job's outputs (one per prompt and choice) and token counts."""

    outputs: list[GenerationOutput]
    usage: Usage
    batch_size: int | None = Field(None, description="Outputs decoded together with these (GET /metrics).")


# --- Fine-tuning jobs -------------------------------------------------------------------------------------


class FineTuneParams(StoredData):
    """What a fine-tuning job trains on and with (the gateway checked every value against its settings).

    dataset and hyperparameters stay JSON here: the worker validates them with shared.fine_tuning's models
    when it starts (a stored value those refuse fails the job with its own error code), and the views show
    them as they were stored.
    """

    training_file: str | None = None
    validation_file: str | None = None
    dataset: dict[str, JsonValue] | None = None  # a shared.fine_tuning.HubDataset
    suffix: str | None = None
    seed: int = 0
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, JsonValue]  # shared.fine_tuning.ResolvedHyperparameters
    # A fine-tuned model or checkpoint of the tenant to continue from (its adapter is the starting point; its
    # LoRA shape wins over the hyperparameters'); None trains a new adapter on the base.
    parent_model: str | None = None


Figures = dict[str, int | float | None]  # named training figures (losses, counts, rates); ints stay ints


class CheckpointNote(StoredData):
    """The checkpoint a cancelled fine-tune stopped at."""

    step: int
    path: str  # relative to the artifact store
    metrics: Figures


class SampleGeneration(StoredData):
    """A finished fine-tune's greedy answer to one held-out validation prompt, and the base model's, for contrast
    (worker/sample_generations.py; at most fine_tune_sample_tokens tokens each)."""

    prompt: str  # the instruction (and input) as the record gave it, or the conversation's last user turn
    reference: str | None = None  # the validation record's own answer, when it has one
    fine_tuned: str  # the adapter's greedy answer
    base: str | None = None  # the base model's greedy answer (None: not generated)


class FineTuneResult(StoredData):
    """A fine-tuning job's result column, which its worker rewrites as the job goes.

    While it runs: the progress figures (step, total_steps, train_loss, trained_tokens, estimated_finish).
    Cancelled: where it stopped (step, total_steps, trained_tokens, checkpoint).
    Succeeded: the model it made (fine_tuned_model, trained_tokens, metrics, result_files, adapter_path) and its
    answers to a few validation prompts beside the base model's (samples).
    """

    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None  # mean training loss of the steps since the previous progress write
    trained_tokens: int | None = None
    estimated_finish: datetime | None = None
    checkpoint: CheckpointNote | None = None
    fine_tuned_model: str | None = None
    metrics: Figures | None = None
    result_files: list[str] = Field(default_factory=list)
    adapter_path: str | None = None
    samples: list[SampleGeneration] = Field(default_factory=list)


# --- Exports of a fine-tuned model ----------------------------------------------------------------------------

ExportDtype = Literal["float16", "float32"]


class ExportParams(StoredData):
    """What an export job merges: the adapter of a fine-tune (its model, or one of its checkpoints) into its base
    model loaded unquantized in dtype. The job row's model is the adapter's model id, base_model the base."""

    fine_tuning_job_id: str
    dtype: ExportDtype = "float16"
    checkpoint: str | None = None  # a checkpoint model id of that job; None: the job's fine-tuned model


class ExportResult(StoredData):
    """A succeeded export: the tar.gz of the Hugging Face model folder, a file row of the tenant."""

    file_id: str
    bytes: int
    sha256: str
    seconds: float | None = None  # from claim to the stored archive


JobParams = GenerationParams | FineTuneParams | ExportParams
JobResult = GenerationResult | FineTuneResult | ExportResult
