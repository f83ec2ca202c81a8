"""/v1/chat/completions and logprobs through the official openai SDK (strict response validation), against real
processes: a gateway and a generate worker on Postgres and Redis serving the tiny GPT-2."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.systems import System

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Name a colour."}]


def sdk(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="unused", _strict_response_validation=True)


def base_model(system: System) -> str:
    return system.env["LLMQ_BASE_MODEL"]


def test_chat_completion_is_the_completion_of_the_prompt_the_chat_template_renders(
    production_system: System,
) -> None:
    from shared.prompts import alpaca_prompt

    client, model = sdk(production_system), base_model(production_system)
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    # GPT-2 ships no chat template: the base model's is the Alpaca prompt written as one.
    raw = client.completions.create(model=model, prompt=alpaca_prompt("Name a colour."), max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.model == model
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens == raw.usage.prompt_tokens  # type: ignore[union-attr]
    assert chat.choices[0].logprobs is None
    job = httpx.get(f"{production_system.base_url}/v1/generations/{chat.id}").json()
    assert job["outputs"][0]["text"] == chat.choices[0].message.content  # a generation job like any other


def test_text_parts_system_and_developer_messages_render_like_strings(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]
    a = client.chat.completions.create(model=model, messages=plain, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    b = client.chat.completions.create(model=model, messages=parts, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_streamed_chat_sends_the_role_first_then_adds_up_to_the_whole_answer(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    ask = dict(model=model, messages=HELLO, max_completion_tokens=24, temperature=0, n=2, seed=3)
    whole = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    stream = openai.OpenAI(base_url=f"{production_system.base_url}/v1", api_key="x").chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}
    )
    chunks: list[ChatCompletionChunk] = list(stream)
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump(), strict=True)
    first = {c.choices[0].index: c.choices[0].delta for c in reversed(chunks) if c.choices}
    assert {i: d.role for i, d in first.items()} == {0: "assistant", 1: "assistant"}
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_sends_no_usage_chunk(production_system: System) -> None:
    client = openai.OpenAI(base_url=f"{production_system.base_url}/v1", api_key="x")
    chunks = list(
        client.chat.completions.create(
            model=base_model(production_system),
            messages=HELLO,
            max_tokens=4,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_n_choices_and_seed_are_reproducible(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    ask = dict(model=model, messages=HELLO, max_tokens=8, temperature=1.0, n=2, seed=42)
    first = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    again = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content


def test_stop_cuts_the_answer_before_the_stop_string(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    free = client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    text = free.choices[0].message.content or ""
    stop = text[3:5]
    assert stop
    cut = client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0, stop=stop)  # type: ignore[arg-type]
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_the_chosen_tokens_with_their_top_alternatives(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    chat = client.chat.completions.create(
        model=model,
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    choice = chat.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    assert len(entries) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # Greedy decoding takes the likeliest token: its logprob is the top one.
        assert math.isclose(e.logprob, e.top_logprobs[0].logprob, abs_tol=1e-5)
        assert e.token == e.top_logprobs[0].token and bytes(e.bytes or []) == e.token.encode()


def test_completion_logprobs_in_the_legacy_shape(production_system: System) -> None:
    client, model = sdk(production_system), base_model(production_system)
    done = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert "".join(logprobs.tokens) == done.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-5 for top, lp in
               zip(logprobs.top_logprobs or [], logprobs.token_logprobs, strict=True))  # fmt: skip
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
    )
    assert chat.choices[0].logprobs is not None  # the same forward pass gives both shapes


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"temperature": 3}, "temperature"),
        ({"n": 99}, "n"),
        ({"top_logprobs": 2}, None),
    ],
)
def test_unsupported_or_bad_parameters_raise_bad_request_naming_the_param(
    production_system: System, extra: dict[str, object], param: str | None
) -> None:
    client, model = sdk(production_system), base_model(production_system)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=HELLO, **extra)  # type: ignore[call-overload]
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param and error["code"]


def test_unknown_model_is_not_found(production_system: System) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk(production_system).chat.completions.create(model="ft:nope", messages=HELLO)  # type: ignore[arg-type]


def test_cli_python_client_and_sdk_chat_show_the_model_the_same_conversation(production_system: System) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from client import LlmqClient

    client, model = sdk(production_system), base_model(production_system)
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Name a colour."}]
    one = client.chat.completions.create(model=model, messages=first, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    answer = one.choices[0].message.content or ""
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Another."}]
    two = client.chat.completions.create(model=model, messages=second, max_tokens=6, temperature=0)  # type: ignore[arg-type]

    with LlmqClient(production_system.base_url, api_key="") as llmq:
        assert llmq.chat(first, model=model, max_tokens=6, temperature=0).choices[0].message.content == answer

    args = ["--url", production_system.base_url, "chat", "--system", "Be brief.", "--max-tokens", "6"]
    session = CliRunner().invoke(app, [*args, "--temperature", "0"], input="Name a colour.\nAnother.\n")
    assert session.exit_code == 0, session.output
    assert session.stdout == f"{answer}\n{two.choices[0].message.content}\n"  # streamed, with its history


def test_generate_with_template_renders_the_prompt_as_chat_does(production_system: System) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    client, model = sdk(production_system), base_model(production_system)
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    args = ["--url", production_system.base_url, "generate", "--template", "--max-tokens", "6", "--temperature", "0"]
    result = CliRunner().invoke(app, [*args, "Name a colour."])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{chat.choices[0].message.content}\n"
