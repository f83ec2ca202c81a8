"""A chat request as a generation job: its conversation, the model's chat template, its sampling settings.

Reusable outside the route (a batch line that targets /v1/chat/completions runs through chat_job_params too).
The gateway does not render the conversation: it stores it with the template of the model asked for (a
fine-tuned model's, from its manifest; None for a base model, whose template the worker's tokenizer and
settings give), and the generate worker renders it with the tokenizer's apply_chat_template.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from gateway import owned
from gateway.catalog import resolve_model
from gateway.submission import check_caps
from shared.chat_schemas import ChatCompletionRequest
from shared.chat_templates import adapter_chat_template
from shared.job_data import ChatTurn, GenerationParams
from shared.settings import Settings


def model_chat_template(session: Session, tenant: str, model_id: str) -> str | None:
    """The chat template a fine-tuned model was trained with; None for a base model (the worker knows it)."""
    row = owned.fine_tuned_model(session, tenant, model_id)
    return adapter_chat_template(row.manifest) if row is not None else None


def conversation_text(conversation: list[ChatTurn]) -> str:
    """The conversation's text as a prompt stands for it in a job (batch sizing, display)."""
    return "\n".join(turn.content for turn in conversation)


def chat_job_params(
    session: Session, settings: Settings, tenant: str, body: ChatCompletionRequest
) -> tuple[tuple[str, str], GenerationParams]:
    """((model, base model), job params) of a valid chat request; 400 over a cap, 404 for an unknown model."""
    conversation = [ChatTurn(role=m.turn_role(), content=m.text()) for m in body.messages]
    text = conversation_text(conversation)
    check_caps([text], "messages", True, body.new_tokens(), body.n, body.stop, settings)
    model = resolve_model(session, settings, tenant, body.model)
    params = GenerationParams(
        prompts=[text],
        conversations=[conversation],
        chat_template=model_chat_template(session, tenant, model[0]),
        max_tokens=body.new_tokens(),
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop,
        seed=body.seed,
        stream=body.stream,
        user=body.user,
        metadata=body.metadata,
        logprobs=body.logprobs_asked(),
    )
    return model, params


def instruction_params(
    session: Session, tenant: str, model_id: str, prompts: list[str]
) -> tuple[list[list[ChatTurn]], str | None]:
    """(conversations, template) that treat each prompt as one user turn under the model's chat template
    (/v1/completions' template "model", `llmq generate --template`)."""
    conversations = [[ChatTurn(role="user", content=p)] for p in prompts]
    return conversations, model_chat_template(session, tenant, model_id)
