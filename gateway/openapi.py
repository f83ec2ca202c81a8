"""The OpenAPI schema with the limits that come from settings written into it, so generated clients know them.

pydantic states the limits a request model declares; the caps set per deployment (LLMQ_MAX_NEW_TOKENS,
LLMQ_MAX_N, LLMQ_MAX_PROMPT_CHARS, LLMQ_MAX_PROMPTS_PER_JOB, LLMQ_MAX_STOP_CHARS, the training caps, the
upload limits) are checked in code (gateway/submission.py, gateway/fine_tuning_checks.py,
gateway/routes/files.py) and added here, to the schema this gateway serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

from gateway.errors import openai_route
from shared.settings import Settings


def install(app: FastAPI, settings: Settings) -> None:
    """Makes app.openapi() state the settings' caps."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # generate() caches the schema on the app; completed in place
            state_caps(schema, settings)
            openai_statuses(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def openai_statuses(schema: dict[str, Any]) -> None:
    """On OpenAI's routes a bad request answers 400, not 422 (gateway/errors.py): the schema says so."""
    for path, operations in schema.get("paths", {}).items():
        if not openai_route(path):
            continue
        for operation in operations.values():
            responses = operation.get("responses", {})
            invalid = responses.pop("422", None)
            if invalid is not None:
                merged = responses.get("400", {}).get("description", "")
                responses["400"] = invalid | {"description": f"{merged} {invalid['description']}".strip()}


def _variants(node: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    """The schema itself or its anyOf alternatives that are of this JSON type."""
    for variant in node.get("anyOf", [node]):
        if variant.get("type") == kind:
            yield variant


def state_caps(schema: dict[str, Any], settings: Settings) -> None:
    """Writes the settings' caps into an OpenAPI schema of the gateway."""
    models = schema["components"]["schemas"]
    _state_generation_caps(models, settings)
    _state_chat_caps(models, settings)
    _state_training_caps(models, settings)
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "wait":
                    parameter["description"] = (
                        f"Seconds to wait for a terminal status; longer waits end after {settings.max_wait_seconds} s."
                    )
    upload = next(m for n, m in models.items() if n.startswith("Body_upload_file"))
    upload["properties"]["file"]["description"] = (
        f"Alpaca records as JSON Lines or one JSON array: at most {settings.max_upload_bytes} bytes and "
        f"{settings.max_records} records; instruction, input and output each at most {settings.max_field_chars} "
        "characters."
    )


def _state_generation_caps(models: dict[str, Any], settings: Settings) -> None:
    """The generation caps (gateway/submission.py) on the bodies of generations and completions."""
    prompt = {"minLength": 1, "maxLength": settings.max_prompt_chars}
    for name in ("GenerationRequest", "CompletionRequest"):
        fields = models[name]["properties"]
        fields["max_tokens"]["maximum"] = settings.max_new_tokens
        fields["n"]["maximum"] = settings.max_n
        for field in ("prompt", "prompts"):
            for text in _variants(fields.get(field, {}), "string"):
                text.update(prompt)
            for listed in _variants(fields.get(field, {}), "array"):
                listed.update(minItems=1, maxItems=settings.max_prompts_per_job)
                listed["items"].update(prompt)
        stop_text = {"minLength": 1, "maxLength": settings.max_stop_chars}  # empty refused; the total is capped
        for text in _variants(fields["stop"], "string"):
            text.update(stop_text)
        for stops in _variants(fields["stop"], "array"):
            stops.update(maxItems=4)
            stops["items"].update(stop_text)
        fields["n"]["description"] = (
            f"Outputs per prompt (output i*n+j is choice j of prompt i); prompts x n at most "
            f"{settings.max_prompts_per_job}."
        )


def _state_chat_caps(models: dict[str, Any], settings: Settings) -> None:
    """The generation caps on a chat request: its texts, token limits, n and stop strings."""
    text = {"maxLength": settings.max_prompt_chars}  # all messages' text together is capped the same
    fields = models["ChatCompletionRequest"]["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        for number in _variants(fields[name], "integer"):
            number["maximum"] = settings.max_new_tokens
    fields["n"]["maximum"] = settings.max_n
    for content in _variants(models["ChatMessage"]["properties"]["content"], "string"):
        content.update(text)
    models["TextPart"]["properties"]["text"].update(text)
    stop_text = {"minLength": 1, "maxLength": settings.max_stop_chars}
    for stop in _variants(fields["stop"], "string"):
        stop.update(stop_text)
    for stops in _variants(fields["stop"], "array"):
        stops.update(maxItems=4)
        stops["items"].update(stop_text)


def _state_training_caps(models: dict[str, Any], settings: Settings) -> None:
    """The fine-tuning caps (gateway/fine_tuning_checks.py) on the hyperparameters and the hub dataset."""
    fields = models["Hyperparameters"]["properties"]
    caps = {
        "n_epochs": settings.max_train_epochs,
        "batch_size": settings.max_train_batch_size,
        "max_steps": settings.max_train_steps,
        "save_every_steps": settings.max_train_steps,
        "eval_every_steps": settings.max_train_steps,
    }
    for field, cap in caps.items():
        for number in _variants(fields[field], "integer"):
            number.setdefault("minimum", 1)
            number["maximum"] = cap
    for number in _variants(fields["learning_rate_multiplier"], "number"):
        number.update(exclusiveMinimum=0, maximum=100)  # checked by Hyperparameters' own validator
    for number in _variants(models["HubDataset"]["properties"]["sample_size"], "integer"):
        number["maximum"] = settings.max_records
