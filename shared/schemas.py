"""Request and response bodies of the REST API (pydantic), shared by gateway, client and tests."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from shared.fine_tuning import HubDataset, Hyperparameters
from shared.job_data import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    ExportDtype,
    Figures,
    GenerationOutput,
    JobError,
    JobKind,
    SampleGeneration,
    Usage,
)
from shared.request_fields import Name, RequestModel, Text
from shared.statuses import JobStatus


def _stop_as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _stop_not_empty(value: list[str] | None) -> list[str] | None:
    if value is not None and any(s == "" for s in value):
        raise ValueError("stop sequences must not be empty")
    return value


# `stop` of generations and completions: one string or a list of them, none empty (the total length is
# capped by settings.max_stop_chars at the gateway).
StopStrings = Annotated[
    list[Text] | None,
    BeforeValidator(_stop_as_list, json_schema_input_type=Text | list[Text] | None),
    AfterValidator(_stop_not_empty),
]


# --- Error answers (every status the API answers on purpose, documented in the OpenAPI schema) ---


class ApiErrorObject(BaseModel):
    """The OpenAI-style error object SDKs read."""

    message: str
    type: str
    code: str
    param: str | None = Field(None, description="The request field at fault (validation errors).")


class ErrorResponse(BaseModel):
    """An error answer: a short stable `detail` and the OpenAI-style `error`."""

    detail: str
    error: ApiErrorObject


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "prompts", 1].')
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """A 422: every problem found (an uploaded file's first bad record as text), the first as `error`."""

    detail: list[ValidationIssue] | str
    error: ApiErrorObject


class GenerationRequest(RequestModel):
    """POST /v1/generations: one or more prompts run on one model with one set of sampling settings."""

    model: Name | None = Field(None, min_length=1, max_length=512, description="Model id; default: the base model.")
    prompt: Text | None = Field(None, description="A single prompt (or use prompts).")
    prompts: list[Text] | None = Field(None, min_length=1, description="Several prompts, one output each.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Most new tokens per prompt.")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: StopStrings = Field(None, max_length=4, description="Up to 4 strings that end the text.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible per prompt.")
    n: int = Field(1, ge=1, description="Outputs per prompt (output i*n+j is choice j of prompt i).")
    template: Literal["raw", "model"] = Field(
        "raw", description="'model' sends each prompt as a user turn rendered with the model's chat template."
    )

    @model_validator(mode="after")
    def _one_of_prompt_or_prompts(self) -> GenerationRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of prompt or prompts")
        return self

    def prompt_list(self) -> list[str]:
        """The prompts as a list, whichever field carried them."""
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerationJob(BaseModel):
    """A generation job as clients see it."""

    id: str
    object: Literal["generation"] = "generation"
    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_seconds: float | None = Field(description="From submission to the start of the last attempt.")
    run_seconds: float | None = Field(description="From the start of the last attempt to the end.")
    attempt: int
    request: dict[str, Any]
    outputs: list[GenerationOutput] | None
    usage: Usage | None
    error: JobError | None


class QueueState(BaseModel):
    """Where a queued job stands: its place in its queue and whether any worker of its kind is alive to run it."""

    position: int = Field(description="1: the next job of its kind (and base model) to be claimed.")
    live_workers: int = Field(description="Workers of the job's kind whose heartbeat is fresh and not draining.")
    worker_alive: bool = Field(description="False: no worker of this kind is running; the job waits until one starts.")


class JobSummary(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    error: JobError | None
    queue: QueueState | None = Field(None, description="While queued (GET of one job): position and worker liveness.")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobSummary]
    has_more: bool


class WorkerObject(BaseModel):
    id: str = Field(description="host:pid, as a running job's worker.")
    object: Literal["worker"] = "worker"
    kind: JobKind
    host: str
    pid: int
    model: str = Field(description="The base model it serves or trains on.")
    current_jobs: list[str]
    draining: bool = Field(description="Stopping (SIGTERM): it finishes or hands back what it runs, claims nothing.")
    live: bool = Field(description="Its last heartbeat is younger than worker_stale_seconds.")
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerObject]


class Readiness(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str]


# --- Files, fine-tuning and models, in the shapes of the OpenAI API (created_at as unix seconds) ---


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    records: int = Field(description="Validated Alpaca records in the file.")
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class SupervisedMethod(RequestModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(RequestModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
MetadataKey = Annotated[Name, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[Text, Field(max_length=512)]


class FineTuningJobRequest(RequestModel):
    """POST /v1/fine_tuning/jobs (OpenAI's shape; llmq extensions documented per field)."""

    model: Name = Field(
        min_length=1,
        max_length=512,
        description="Base model to fine-tune, or one of your fine-tuned models or checkpoints (ft:...) to continue "
        "from: training starts from its adapter (whose LoRA rank, alpha and target modules it keeps).",
    )
    training_file: Name | None = Field(
        None, min_length=1, max_length=64, description="Id of an uploaded file (purpose fine-tune)."
    )
    validation_file: Name | None = Field(
        None, min_length=1, max_length=64, description="Id of an uploaded file for validation loss."
    )
    dataset: HubDataset | None = Field(
        None,
        description="llmq extension: a hub dataset instead of training_file (default: the first offered dataset, "
        "tatsu-lab/alpaca unless the operator changed it).",
    )
    suffix: Name | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated OpenAI form of method.")
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported; must be empty.")

    @model_validator(mode="after")
    def _one_data_source(self) -> FineTuningJobRequest:
        if self.training_file is not None and self.dataset is not None:
            raise ValueError("give training_file or dataset, not both")
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError("give method or hyperparameters, not both")
        return self

    def chosen_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters from method.supervised, the deprecated field, or the defaults."""
        if self.method is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class FineTuningJobError(JobError):
    """A failed job's error in OpenAI's fine-tuning shape, which adds `param` (null: no field was at fault)."""

    param: str | None = None


class FineTuningJobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJobProgress(BaseModel):
    """llmq extension: where a running fine-tune stands, from its latest progress write (at most every 2 s)."""

    step: int = Field(description="Optimizer steps done.")
    total_steps: int = Field(description="Optimizer steps the job trains for.")
    train_loss: float | None = Field(description="Mean training loss of the steps since the previous write.")


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = "llmq"
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    training_file: str | None
    validation_file: str | None
    hyperparameters: FineTuningJobHyperparameters
    method: dict[str, Any]
    result_files: list[str]
    trained_tokens: int | None
    estimated_finish: int | None
    error: FineTuningJobError | None
    seed: int
    user_provided_suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[Any] = Field(default_factory=list)
    dataset: dict[str, Any] | None = Field(description="llmq extension: the hub dataset, if any.")
    metrics: Figures | None = Field(description="llmq extension: losses and throughput so far.")
    progress: FineTuningJobProgress | None = Field(
        default=None, description="llmq extension: the current step and training loss while the job runs; else null."
    )
    queue: QueueState | None = Field(
        default=None, description="llmq extension: while queued, its queue position and whether a train worker lives."
    )
    samples: list[SampleGeneration] = Field(
        default_factory=list,
        description="llmq extension: once succeeded, the fine-tuned model's greedy answers to a few validation "
        "prompts beside the base model's (settings fine_tune_samples, fine_tune_sample_tokens); else empty.",
    )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class FineTuningCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ExportRequest(RequestModel):
    """POST /v1/fine_tuning/jobs/{job_id}/export (llmq extension: OpenAI has no export)."""

    dtype: ExportDtype = Field(
        "float16", description="Weights of the exported model: the base is loaded unquantized in this dtype and the "
        "adapter merged into it (never into nf4 weights)."
    )  # fmt: skip
    checkpoint: Name | None = Field(
        None, min_length=1, max_length=600, description="A checkpoint model id of this job (ft:...:ckpt-step-<n>) to "
        "export instead of its final model; needed for a cancelled job."
    )  # fmt: skip


class FineTuningExport(BaseModel):
    """An export of a fine-tune: a job on the train queue that writes a standalone Hugging Face model folder."""

    id: str
    object: Literal["fine_tuning.export"] = "fine_tuning.export"
    fine_tuning_job_id: str
    model: str = Field(description="The fine-tuned model or checkpoint merged into its base.")
    base_model: str
    dtype: ExportDtype
    status: JobStatus
    file_id: str | None = Field(
        description="Once succeeded: a tar of the model folder (purpose fine-tune-results), GET /v1/files/{id}/content."
    )
    bytes: int | None
    error: JobError | None
    created_at: int
    finished_at: int | None


class FineTuningExportList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningExport]
    has_more: bool


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmq"
    parent: str | None = Field(None, description="The base model a fine-tuned model was trained from.")
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# --- /v1/completions (OpenAI's legacy completions shape) ---


class StreamOptions(RequestModel):
    # OpenAI adds options here over time (include_obfuscation, ...); SDKs may send them: ignored, never stored.
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = True


class CompletionRequest(RequestModel):
    """POST /v1/completions. Unsupported OpenAI options are accepted only at their neutral values."""

    model: Name = Field(min_length=1, max_length=512)
    prompt: Text | list[Text] = Field(description="A prompt or a list of prompts (token arrays not supported).")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: StopStrings = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256)
    template: Literal["raw", "model"] = Field(
        "raw",
        description="llmq extension: 'model' treats each prompt as an instruction and wraps it in the prompt "
        "template stored with the model (the Alpaca template for the base model).",
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Each token's logprob and this many likeliest alternatives (at most 5)."
    )
    best_of: int | None = Field(None, ge=1, le=1, description="Not supported: must be null or 1.")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: must be 0.")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: must be 0.")
    logit_bias: dict[Name, float] | None = Field(None, max_length=0, description="Not supported: must be empty.")
    suffix: Text | None = Field(None, max_length=0, description="Not supported: must be null.")

    def prompt_list(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token of the choice's text, its logprob and the likeliest alternatives."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
