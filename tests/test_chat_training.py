"""Fine-tuning on chat records (`messages`) and chat templates at train and serve time: the record checks, the
loss on assistant turns only, the same tokens at train and serve time, and an OpenAI SDK session that
fine-tunes on messages data and chats with the result (real gateway, train and generate workers)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.alpaca import UNCAPPED, BadRecord, Limits, jsonl_records
from shared.chat_templates import ALPACA_CHAT_TEMPLATE
from shared.job_data import ChatTurn, GenerationParams
from tests.systems import System, isolated_system

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue", "weight": 0},
    {"role": "user", "content": "And of grass?"},
    {"role": "assistant", "content": "Green"},
]


def chat_record(messages: list[dict[str, Any]], line: int = 1) -> dict[str, str]:
    (record,) = jsonl_records(io.BytesIO(b"\n" * (line - 1) + json.dumps({"messages": messages}).encode()), UNCAPPED)
    return record


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# --- Record checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([], "messages must be a non-empty list"),
        ([{"role": "user", "content": "Hi"}], "must end with an assistant message"),
        ([{"role": "assistant", "content": "Hi"}], "message 0: expected a user message, got assistant"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected a assistant"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "message 0: content is empty"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}], "weight must be 0"),
        ([{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}], "only allowed on"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}], "no assistant"),
        ([{"role": "tool", "content": "a"}], "message 0: role must be one of"),
        ([{"role": "user", "content": "a", "tool_calls": []}], "unknown field 'tool_calls'"),
    ],
)
def test_chat_records_are_checked_naming_the_line_and_message(messages: list[dict[str, Any]], why: str) -> None:
    with pytest.raises(BadRecord) as caught:
        chat_record(messages, line=3)
    assert caught.value.where == "line 3" and why in caught.value.why, caught.value


def test_a_chat_record_over_the_field_cap_is_refused() -> None:
    content = b'{"messages": [{"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "b"}]}'
    with pytest.raises(BadRecord, match="longer than 3 characters"):
        list(jsonl_records(io.BytesIO(content), Limits(max_records=10, max_field_chars=3)))


# --- Templates at train and serve time ----------------------------------------------------------------------


def test_alpaca_records_train_on_the_stanford_prompt_rendered_by_the_alpaca_chat_template(tokenizer: Any) -> None:
    from worker.alpaca_data import to_examples
    from worker.chat_data import training_examples

    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Reverse.", "input": "a b", "output": "\nb a"},
    ]
    assert training_examples(records, tokenizer, ALPACA_CHAT_TEMPLATE, 256) == to_examples(records)


def test_train_and_serve_time_render_a_conversation_to_the_same_tokens(tokenizer: Any) -> None:
    from worker.chat_data import tokenized
    from worker.chat_rendering import with_rendered_prompts

    example = tokenized(chat_record(CONVERSATION), tokenizer, ALPACA_CHAT_TEMPLATE, 256)
    ids, labels = example["input_ids"], example["labels"]
    for end in (2, 4):  # the conversation up to each user turn, as a chat request would send it
        turns = [ChatTurn.model_validate({k: m[k] for k in ("role", "content")}) for m in CONVERSATION[:end]]
        params = GenerationParams(prompts=["x"], conversations=[turns], chat_template=ALPACA_CHAT_TEMPLATE)
        served = with_rendered_prompts(params, tokenizer, None).prompts[0]
        served_ids = tokenizer(served, add_special_tokens=False)["input_ids"]
        assert ids[: len(served_ids)] == served_ids  # what the model is served is what it trained on
        assert all(label == -100 for label in labels[: len(served_ids)])  # and it is never trained on
    # Loss falls on the weight-1 answer and its EOS only (the weight-0 answer "Blue" is context).
    trained = [token for token, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(trained) == " Green" + tokenizer.eos_token
    assert trained[-1] == tokenizer.eos_token_id == ids[-1]


def test_a_conversation_longer_than_max_seq_len_fails_the_job_naming_its_line(tokenizer: Any) -> None:
    from worker.alpaca_data import DatasetUnavailable
    from worker.chat_data import tokenized

    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DatasetUnavailable, match=r"line 7: the conversation is \d+ tokens, longer than max_seq_len"):
        tokenized(chat_record(long, line=7), tokenizer, ALPACA_CHAT_TEMPLATE, 64)


def test_the_base_model_template_is_the_setting_then_the_tokenizers_then_alpaca(tokenizer: Any) -> None:
    from worker.chat_rendering import base_template

    assert tokenizer.chat_template is None  # GPT-2 ships none
    assert base_template(tokenizer, None) == ALPACA_CHAT_TEMPLATE
    assert base_template(tokenizer, "{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"


# --- Through the SDK: fine-tune on messages, then chat with the result --------------------------------------


@pytest.fixture(scope="module")
def training_system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway + generate and train workers on a database and Redis db of their own: a session system's
    generate worker on the same base model would otherwise claim the chat job and miss the adapter (it reads
    another artifact store)."""
    data = tmp_path_factory.mktemp("chat-train")
    with isolated_system("llmq_chat_training", 12, tiny_model, data, ("generate", "train")) as system:
        yield system


def messages_file() -> bytes:
    colours = [("sky", "Blue"), ("grass", "Green"), ("snow", "White"), ("coal", "Black")]
    lines = []
    for thing, colour in colours * 4:
        messages = [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"Colour of {thing}?"},
            {"role": "assistant", "content": colour},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.e2e
@pytest.mark.slow
def test_fine_tune_on_messages_then_chat_with_the_result_through_the_sdk(training_system: System) -> None:
    client = openai.OpenAI(
        base_url=f"{training_system.base_url}/v1", api_key="unused", _strict_response_validation=True
    )
    base = training_system.env["LLMQ_BASE_MODEL"]
    uploaded = client.files.create(file=("colours.jsonl", messages_file()), purpose="fine-tune")
    hp = {"n_epochs": 1, "max_steps": 4, "batch_size": 4, "learning_rate": 2e-3, "lora_dropout": 0.0}
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=uploaded.id,
        suffix="chat",
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},  # type: ignore[typeddict-item]
    )
    deadline = time.monotonic() + 240
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None and job.trained_tokens

    ask = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of sky?"}]
    chat = client.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert chat.model == job.fine_tuned_model and chat.choices[0].message.role == "assistant"
    # The adapter's template (its manifest's) rendered the prompt: the same text as a raw completion of it.
    prompt = "Answer in one word.\n\n### Instruction:\nColour of sky?\n\n### Response:"
    raw = client.completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage is not None and chat.usage.prompt_tokens == raw.usage.prompt_tokens  # type: ignore[union-attr]
