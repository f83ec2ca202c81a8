"""POST /v1/chat/completions: OpenAI's request and response shapes (chat.completion, chat.completion.chunk).

The request model is reusable on its own (a batch line that targets /v1/chat/completions validates with it);
gateway/chat_jobs.py turns a valid one into a generation job's params. OpenAI parameters llmq does not
support (tools, response_format, audio, ...) are named fields that refuse any value but null, so the 400
names the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from shared.job_data import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Usage
from shared.request_fields import Name, RequestModel, Text
from shared.schemas import MetadataKey, MetadataValue, StopStrings, StreamOptions

# max_tokens of a chat request that names neither max_tokens nor max_completion_tokens.
CHAT_DEFAULT_MAX_TOKENS = 128
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 256  # messages in one request (their text together is capped by max_prompt_chars)
MAX_PARTS = 64  # text parts in one message


def _unsupported(value: object) -> object:
    if value is not None:
        raise PydanticCustomError("unsupported_parameter", "is not supported by llmq")
    return value


# A parameter of OpenAI's API that llmq does not support: null (or absent) only.
Unsupported = Annotated[Any, AfterValidator(_unsupported)]


def _neutral(neutral: object) -> Any:
    """A parameter llmq does not support, accepted only at its neutral value."""

    def check(value: object) -> object:
        if value is not None and value != neutral:
            raise PydanticCustomError(
                "unsupported_parameter", "is not supported by llmq (only {neutral})", {"neutral": repr(neutral)}
            )
        return value

    return Annotated[Any, AfterValidator(check)]


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    """One message of the conversation. content: a string or a list of text parts (joined)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]
    name: Name | None = Field(None, max_length=64, description="Accepted and ignored.")

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def turn_role(self) -> Literal["system", "user", "assistant"]:
        """The role a template renders: developer messages are system messages (OpenAI's newer name)."""
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(RequestModel):
    """POST /v1/chat/completions (OpenAI's shape)."""

    model: Name = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated OpenAI name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description=f"Most new tokens per choice (default {CHAT_DEFAULT_MAX_TOKENS})."
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: StopStrings = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    user: Text | None = Field(None, max_length=256)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    store: bool | None = Field(None, description="Accepted; llmq keeps every job (GET /v1/generations/{id}).")
    frequency_penalty: _neutral(0) = None  # type: ignore[valid-type]
    presence_penalty: _neutral(0) = None  # type: ignore[valid-type]
    logit_bias: _neutral({}) = None  # type: ignore[valid-type]
    parallel_tool_calls: _neutral(False) = None  # type: ignore[valid-type]
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    response_format: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    reasoning_effort: Unsupported = None
    service_tier: Unsupported = None
    web_search_options: Unsupported = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise PydanticCustomError("invalid_value", "give max_tokens or max_completion_tokens, not both")
        return self

    def new_tokens(self) -> int:
        """Most new tokens per choice."""
        return self.max_completion_tokens or self.max_tokens or CHAT_DEFAULT_MAX_TOKENS

    def logprobs_asked(self) -> int | None:
        """How many alternatives per token to report (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# --- Responses ---------------------------------------------------------------------------------------------


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None
