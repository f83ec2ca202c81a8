"""The batched generation runtime on a real (tiny) GPT-2, in process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from worker.generation import Generation, PromptTooLong, Request, SamplingParams, generate
from worker.model_loading import LoadedModel, load_base_model, warn_if_4bit_is_slow_here

PROMPTS = [
    "Below is an instruction that describes a task.",
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "Reverse the following list of words: red blue green",
]


@pytest.fixture(scope="module", params=["nf4", "fp32"])
def loaded(request: pytest.FixtureRequest, tiny_model: Path) -> LoadedModel:
    return load_base_model(str(tiny_model), "main", request.param, "cpu")


def greedy(max_new_tokens: int = 12, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=stop)


def test_greedy_output_is_identical_alone_and_in_a_mixed_batch(loaded: LoadedModel) -> None:
    alone = [generate(loaded, [Request(p, greedy())])[0] for p in PROMPTS]
    mixed = [Request(p, greedy()) for p in PROMPTS]
    mixed += [Request(p * 2, SamplingParams(max_new_tokens=20, temperature=0.9, seed=i)) for i, p in enumerate(PROMPTS)]
    batched = generate(loaded, mixed)
    assert batched[: len(PROMPTS)] == alone


def test_seed_makes_sampling_reproducible_whatever_shares_the_batch(loaded: LoadedModel) -> None:
    seeded = Request(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234))
    alone = generate(loaded, [seeded])[0]
    with_others = generate(loaded, [Request(PROMPTS[2], greedy(3)), seeded, Request(PROMPTS[1], greedy(20))])[1]
    assert with_others == alone
    other_seed = Request(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=99))
    assert generate(loaded, [other_seed])[0].text != alone.text


def test_max_tokens_ends_with_finish_reason_length(loaded: LoadedModel) -> None:
    (out,) = generate(loaded, [Request(PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0.7, seed=1))])
    if out.finish_reason == "length":
        assert out.completion_tokens == 5
    else:  # it sampled EOS first
        assert out.completion_tokens < 5


def test_stop_sequence_cuts_the_text_and_finishes_with_stop(loaded: LoadedModel) -> None:
    (free,) = generate(loaded, [Request(PROMPTS[0], greedy(16))])
    assert len(free.text) > 4
    stop = free.text[2:4]  # a piece of what greedy decoding writes anyway
    (cut,) = generate(loaded, [Request(PROMPTS[0], greedy(16, stop=(stop,)))])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text


def test_outputs_come_back_in_request_order_with_token_counts(loaded: LoadedModel) -> None:
    outs = generate(loaded, [Request(p, greedy(3)) for p in PROMPTS])
    assert all(isinstance(o, Generation) for o in outs)
    assert [o.prompt_tokens for o in outs] == [len(loaded.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert all(o.completion_tokens <= 3 for o in outs)


def test_prompt_longer_than_the_context_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(PromptTooLong, match="context"):
        generate(loaded, [Request("word " * 2000, greedy(4))])


def test_stop_sequence_at_the_very_start_gives_empty_text(loaded: LoadedModel) -> None:
    (free,) = generate(loaded, [Request(PROMPTS[0], greedy(8))])
    (cut,) = generate(loaded, [Request(PROMPTS[0], greedy(8, stop=(free.text[:1],)))])
    assert cut.text == "" and cut.finish_reason == "stop"


def test_serving_warns_when_this_cpu_has_no_fast_4bit_kernel(
    loaded: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    from bitsandbytes.functional import has_avx512bf16

    slow = loaded.quantization == "nf4" and not has_avx512bf16()  # bitsandbytes' own test for its CPU kernel
    with caplog.at_level(logging.WARNING, logger="worker.model_loading"):
        assert warn_if_4bit_is_slow_here(loaded) == slow
    assert ("LLMQ_QUANTIZATION=fp32" in caplog.text) == slow
