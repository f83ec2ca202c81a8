"""OpenAI's Batch API shapes: the create request, the Batch object and its list, a batch's statuses."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.request_fields import Name, RequestModel
from shared.schemas import MetadataKey, MetadataValue

BatchEndpoint = Literal["/v1/completions", "/v1/chat/completions"]
ENDPOINTS: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions")


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# A batch waits for its jobs in these; the first gateway to see them all ended finalizes it.
RUNNING_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


class BatchRequest(RequestModel):
    """POST /v1/batches."""

    input_file_id: Name = Field(min_length=1, max_length=64, description="An uploaded file of purpose batch.")
    endpoint: BatchEndpoint = Field(description="The endpoint every line of the input file must name as its url.")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None = None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, Any] | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
