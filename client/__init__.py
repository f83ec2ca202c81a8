"""A typed Python client of the llmq gateway (what the `llmq` command uses)."""

from client.client import DEFAULT_URL, TERMINAL, LlmqClient, default_url
from client.errors import (
    AuthError,
    LlmqError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
    UnreachableError,
    ValidationError,
    WaitTimeout,
)

__all__ = [
    "DEFAULT_URL",
    "TERMINAL",
    "AuthError",
    "LlmqClient",
    "LlmqError",
    "NotFoundError",
    "RateLimitError",
    "UnavailableError",
    "UnreachableError",
    "ValidationError",
    "WaitTimeout",
    "default_url",
]
