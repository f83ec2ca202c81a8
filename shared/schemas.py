"""Request and response bodies of the REST API (pydantic), shared by gateway, client and tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.job_states import JobStatus

JobKind = Literal["generate", "train"]


class ErrorInfo(BaseModel):
    code: str
    message: str


class GenerationRequest(BaseModel):
    """POST /v1/generations: one or more prompts run on one model with one set of sampling settings."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, min_length=1, max_length=512, description="Model id; default: the base model."
    )
    prompt: str | None = Field(None, description="A single prompt (or use prompts).")
    prompts: list[str] | None = Field(None, min_length=1, description="Several prompts, one output each.")
    max_tokens: int = Field(16, ge=1, description="Most new tokens per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] | None = Field(None, max_length=4, description="Up to 4 strings that end the text.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible per prompt.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _one_of_prompt_or_prompts(self) -> GenerationRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of prompt or prompts")
        return self

    def prompt_list(self) -> list[str]:
        """The prompts as a list, whichever field carried them."""
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerationOutput(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    error: ErrorInfo | None


class JobSummary(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    error: ErrorInfo | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobSummary]
    has_more: bool


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
