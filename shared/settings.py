"""The one source of configuration: environment variables prefixed LLMQ_ (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.fine_tuning import hub_dataset_id_problem

Quantization = Literal["nf4", "int8", "bf16", "fp32"]

# The Alpaca family on the hub: what dataset.name may be unless an operator says otherwise.
DEFAULT_DATASETS = ("tatsu-lab/alpaca", "yahma/alpaca-cleaned", "vicgalle/alpaca-gpt4")


class Settings(BaseSettings):
    """Every knob of llmq. Each default works on the embedded default (one machine, no servers)."""

    model_config = SettingsConfigDict(env_prefix="LLMQ_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path(".llmq"),
        description="Folder of this host's own files: the embedded database and broker, the artifact store when "
        "artifact_url is unset, and the local scratch and adapter cache of workers.",
    )
    artifact_url: str | None = Field(
        None,
        description="Where uploaded files, checkpoints and adapters live: file:///path or s3://bucket/prefix "
        "(S3, MinIO, Ceph RGW, R2); unset means file://<data_dir>/artifacts. Hosts that share no disk need s3://.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for s3:// artifact URLs (MinIO, Ceph RGW, R2: http(s)://host:port); unset means "
        "AWS (or AWS_ENDPOINT_URL).",
    )
    s3_region: str | None = Field(None, description="S3 region; unset means AWS_REGION / AWS_DEFAULT_REGION.")
    s3_access_key_id: str | None = Field(
        None, description="S3 access key; unset means the usual AWS chain (AWS_ACCESS_KEY_ID, profile, role)."
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key; unset means the usual AWS chain (AWS_SECRET_ACCESS_KEY, profile, role)."
    )
    adapter_cache_bytes: int = Field(
        2 * 2**30,
        ge=0,
        description="Most bytes of adapters a generate worker keeps in its local disk cache "
        "(data_dir/adapter-cache), least recently used out.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the job database; unset means a SQLite file in data_dir. "
        "Production: postgresql+psycopg://user:pass@host/db.",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL; unset means the embedded file broker in data_dir/broker. "
        "Production: redis://host:6379/0.",
    )
    broker_polling_interval: float = Field(
        0.005, description="Seconds between polls of the embedded file broker (Redis needs none)."
    )
    broker_visibility_timeout: int = Field(
        6 * 3600,
        description="Seconds Redis waits before redelivering an unacknowledged message; must exceed the longest task.",
    )

    base_model: str = Field(
        "openai-community/gpt2",
        description="Base model the workers load: a hub id or a local model directory.",
    )
    base_model_revision: str = Field("main", description="Hub revision (branch, tag or commit) of base_model.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template of the base model (the tokenizer's apply_chat_template renders it); unset "
        "means the tokenizer's own, or the Alpaca prompt written as a chat template when it ships none (GPT-2): "
        "shared/chat_templates.py.",
    )
    quantization: Quantization = Field(
        "nf4", description="How the worker loads the base model: nf4 or int8 (bitsandbytes), bf16 or fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the worker runs the model; auto picks CUDA when present."
    )

    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads torch uses in a worker process; 0 keeps torch's default (one per core). "
        "Set it when workers share a machine's cores (llmq up gives each of its two workers half).",
    )

    max_batch_size: int = Field(32, ge=1, description="Most prompts one generate call runs together.")
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="How a generate worker batches: continuous lets jobs join a running batch between decoding "
        "steps and leave when done (worker/scheduler.py); static runs each claimed batch to its longest row.",
    )
    batch_poll_seconds: float = Field(
        0.05,
        ge=0,
        description="While a continuous batch decodes, how often (at most) it asks the database for waiting jobs "
        "and for cancels of its own (while only OpenAI batch requests decode, for cancels at most every second); "
        "0 asks at every decoding step. Also how long a finished batch request's outcome may wait to be written "
        "with others (while an interactive job decodes, up to a second, for the interactive job's write).",
    )
    batch_reserved_rows: int = Field(
        4,
        ge=0,
        description="Rows of a continuous batch that requests of an OpenAI batch leave free (at most a quarter of "
        "max_batch_size), so that an interactive job joins at the next step without pausing a batch row. An "
        "interactive job that needs more rows than are free still joins at the next step: the youngest batch rows "
        "it would push past max_batch_size pause, their KV cache kept, until it ends. 0 lets batch requests fill "
        "every row.",
    )
    batch_rows_beside_interactive: int = Field(
        0,
        ge=0,
        description="While an interactive job decodes in a continuous batch, how many rows of OpenAI batch requests "
        "decode beside it, a fixed number; 0 (the default) leaves the number to interactive_slowdown. The others "
        "pause, their KV cache kept, and resume, oldest first, as those end or once no interactive job decodes.",
    )
    interactive_slowdown: float = Field(
        1.25,
        ge=0,
        description="While an interactive job decodes in a continuous batch (and batch_rows_beside_interactive is "
        "0), rows of OpenAI batch requests decode beside it only as many as keep a decoding step within this factor "
        "of what the interactive rows alone cost, as the worker measures its own steps (worker/step_costs.py): on a "
        "CPU, where each row costs time, a few; on a GPU, where a step costs about the same whatever its rows, all. "
        "The others pause. 0: no limit, every batch row decodes beside interactive jobs.",
    )
    batch_join_rows: int = Field(
        8,
        ge=1,
        description="Most rows of OpenAI batch requests that join a running continuous batch at one step (their "
        "prompts are prefilled in one forward pass, which holds up every row, an interactive newcomer's too); more "
        "join at the steps that follow. Also how many finished batch requests are written back together (see "
        "batch_poll_seconds).",
    )
    max_batch_tokens: int = Field(16384, ge=1, description="Most prompt + new tokens one generate call runs together.")
    max_loaded_adapters: int = Field(8, ge=1, description="Most LoRA adapters a generate worker keeps loaded.")
    max_new_tokens: int = Field(512, ge=1, description="Cap on max_tokens of one generation request.")
    max_prompts_per_job: int = Field(64, ge=1, description="Cap on prompts in one generation job.")
    max_n: int = Field(8, ge=1, description="Cap on n (outputs per prompt).")
    completion_timeout_seconds: float = Field(
        600.0, gt=0, description="How long POST /v1/completions waits for its job before answering 504."
    )
    max_prompt_chars: int = Field(16000, ge=1, description="Cap on characters of one prompt.")
    max_stop_chars: int = Field(
        1000, ge=1, description="Cap on the characters of all stop strings of one request together."
    )
    max_wait_seconds: float = Field(60.0, ge=0, description="Cap on ?wait= of a status request.")

    max_upload_bytes: int = Field(200 * 2**20, ge=1, description="Largest training file accepted, in bytes.")
    max_records: int = Field(200_000, ge=1, description="Most records in one training file.")
    max_batch_requests: int = Field(50_000, ge=1, description="Most lines (requests) in one batch's input file.")
    max_field_chars: int = Field(
        20_000, ge=1, description="Longest instruction, input or output of one record, in characters."
    )

    max_train_epochs: int = Field(50, ge=1, description="Cap on n_epochs of a fine-tune.")
    max_train_batch_size: int = Field(256, ge=1, description="Cap on batch_size (examples per step) of a fine-tune.")
    max_train_steps: int = Field(
        100_000,
        ge=1,
        description="Cap on max_steps of a fine-tune, and on its save_every_steps and eval_every_steps.",
    )
    fine_tune_samples: int = Field(
        3,
        ge=0,
        le=20,
        description="Validation prompts a finished fine-tune answers greedily, with its adapter and with the base "
        "for contrast, shown on the job (API `samples`, `llmq status`, dashboard); 0: none.",
    )
    fine_tune_sample_tokens: int = Field(
        48, ge=1, le=512, description="Most new tokens of each of those sample answers."
    )
    allowed_datasets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DATASETS),
        description="Hub datasets a fine-tune may name in dataset.name (JSON list of owner/name ids; never a "
        "path). The first is the default when a job names neither a training file nor a dataset.",
    )

    max_attempts: int = Field(3, ge=1, description="Times a job may be started before it ends failed.")
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a claimed job stays a worker's without a heartbeat before it is handed on; "
        "workers renew it every third of this.",
    )
    worker_heartbeat_seconds: float = Field(
        5.0, gt=0, description="How often a worker process records that it is alive (GET /v1/workers, /readyz)."
    )
    worker_stale_seconds: float = Field(
        20.0, gt=0, description="A worker whose last heartbeat is older than this counts as gone."
    )
    drain_seconds: float = Field(
        60.0,
        gt=0,
        description="After SIGTERM a train worker checkpoints at its current step, hands the job back and exits; "
        "a generate worker finishes its batch. It exits within this (compose's stop_grace_period is above it).",
    )
    reaper_interval_seconds: float = Field(
        5.0, gt=0, description="How often the reaper looks for expired leases and lost messages."
    )
    republish_after_seconds: float = Field(
        60.0, gt=0, description="A job queued this long since its last message gets another (lost-message repair)."
    )
    gateway_runs_reaper: bool = Field(
        True, description="Run the reaper inside each gateway process (safe with several: every step is conditional)."
    )

    require_api_keys: bool = Field(
        False,
        description="Require `Authorization: Bearer <key>` on every /v1 request. Off only for the embedded "
        "default bound to localhost; `llmq serve` refuses a non-local address without it.",
    )
    rate_limit_per_minute: int = Field(
        6000, ge=0, description="Requests per minute one API key may make (0 = no limit)."
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="Each gateway process remembers a key it found valid this long: a revoked key stops working "
        "within this many seconds (0 = look every key up on every request).",
    )
    auth_failures_per_minute: int = Field(
        20,
        ge=0,
        description="Failed authentications one client address may make per minute; past it every /v1 request "
        "from that address answers 429 until the minute ends (0 = no limit).",
    )
    max_active_jobs_per_tenant: int = Field(
        1000, ge=0, description="Queued plus running jobs one tenant may have at once (0 = no limit)."
    )
    max_request_bytes: int = Field(
        4 * 2**20, ge=1, description="Largest request body outside file uploads, in bytes (chunked too)."
    )
    allowed_base_models: list[str] = Field(
        default_factory=list,
        description="Base models jobs may name (JSON list); empty means only base_model.",
    )

    log_format: Literal["json", "text"] = Field(
        "json",
        description="Log lines of gateway and workers: json (one object per line with time, level, logger, "
        "message and the job id) or text.",
    )
    metrics_window_seconds: float = Field(
        3600.0,
        gt=0,
        description="GET /metrics: the histograms, token and per-model figures cover jobs finished this recently.",
    )
    metrics_window_jobs: int = Field(
        10_000, ge=1, description="GET /metrics: at most this many of the most recently finished jobs are read."
    )
    metrics_token: str | None = Field(
        None,
        description="When set, GET /metrics requires `Authorization: Bearer <metrics_token>` (it names models and "
        "jobs of every tenant). Unset: open while API keys are not required (one tenant, localhost), closed (401) "
        "while they are.",
    )

    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port a worker process serves its own GET /metrics on (tokens, time to first token, batch "
        "sizes, adapter loads, training steps); 0: not served. `llmq up` gives its workers api_port+1 and +2.",
    )
    worker_metrics_host: str = Field("127.0.0.1", description="Address a worker's /metrics binds (0.0.0.0 in compose).")

    api_host: str = Field("127.0.0.1", description="Address the gateway binds (llmq serve / up / demo).")
    api_port: int = Field(8000, description="Port the gateway binds (llmq serve / up / demo).")
    instance_id: str = Field(
        "",
        max_length=64,
        description="A name the gateway reports in GET /healthz (`instance`); `llmq up` and `llmq demo` give the "
        "gateway they start a fresh one, so that another program on the port is never taken for it.",
    )
    gateway_workers: int = Field(
        1, ge=1, description="Gateway processes `llmq serve` starts on its port (one per core is a good start)."
    )

    @field_validator("interactive_slowdown")
    @classmethod
    def _slowdown_is_a_factor(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("interactive_slowdown is a factor of at least 1 (or 0: no limit)")
        return value

    @field_validator("artifact_url")
    @classmethod
    def _file_or_s3(cls, value: str | None) -> str | None:
        # Refused at start-up rather than at the first upload (GCS and R2 speak S3: s3:// with their endpoint).
        if value is not None and not value.startswith(("file:///", "s3://")):
            raise ValueError(f"artifact_url: {value!r} is neither file:///absolute/path nor s3://bucket/prefix")
        return value

    @field_validator("allowed_datasets")
    @classmethod
    def _hub_ids_only(cls, value: list[str]) -> list[str]:
        for name in value:
            problem = hub_dataset_id_problem(name)
            if problem is not None:
                raise ValueError(f"allowed_datasets: {name!r} {problem}")
        return value

    @property
    def base_models(self) -> list[str]:
        """The base models jobs may name: the allowlist, always including base_model."""
        return [self.base_model, *(m for m in self.allowed_base_models if m != self.base_model)]

    @property
    def resolved_database_url(self) -> str:
        """The database URL in force: the setting, or the embedded SQLite file."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'llmq.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL in force: the setting, or the embedded file broker."""
        return self.broker_url or "llmq-files://"

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded file broker."""
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_artifact_url(self) -> str:
        """The artifact store in force: the setting, or a folder under data_dir."""
        return self.artifact_url or (self.data_dir / "artifacts").resolve().as_uri()

    @property
    def scratch_dir(self) -> Path:
        """This host's local working folder (upload spools, training runs): never shared, never an artifact."""
        return (self.data_dir / "scratch").resolve()

    @property
    def adapter_cache_dir(self) -> Path:
        """This host's local cache of adapters pulled from the artifact store."""
        return (self.data_dir / "adapter-cache").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
