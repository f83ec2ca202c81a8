"""The small pretrained GPT-2 llmq ships: what it was trained on, and that the committed weights are what
worker/pretraining.py builds (its first step is rerun here; the whole run takes minutes, see its record)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer

from worker import pretraining
from worker.model_factory import PRETRAINED_DIR, install_pretrained_gpt2
from worker.pretraining import RECORD, PretrainConfig, paragraphs, pretrain

DATA = Path(__file__).resolve().parents[1] / "worker" / "data"


def _outputs(name: str) -> set[str]:
    return {json.loads(line)["output"] for line in (DATA / name).read_text(encoding="utf-8").splitlines()}


def test_pretraining_text_is_shipped_english_without_the_prompt_template() -> None:
    text = paragraphs()
    assert not [p for p in text if "### " in p or "Below is an instruction" in p]
    assert any(p.startswith("ABDOMEN, n.") for p in text)  # The Devil's Dictionary
    assert _outputs("alpaca_sample.jsonl") <= set(text)  # the training sample's outputs
    held_out = _outputs("alpaca_sample_val.jsonl") - _outputs("alpaca_sample.jsonl")
    assert held_out and not held_out & set(text)  # the validation sample stays held out
    assert pretraining.documents(0) == pretraining.documents(0) != pretraining.documents(1)


def test_the_committed_model_is_small_and_records_how_it_was_made() -> None:
    record = json.loads((PRETRAINED_DIR / RECORD).read_text(encoding="utf-8"))
    assert record["config"] == asdict(PretrainConfig())
    assert record["torch"] and record["transformers"] and record["seconds"] > 0
    # It learned: on held-out text, more than 3 nats below a uniform guess (ln 4096 = 8.3; it reached 4.9).
    assert record["final_held_out_loss"] < math.log(record["tokenizer_vocab_size"]) - 3
    assert (PRETRAINED_DIR / "model.safetensors").stat().st_size < 20_000_000
    model = AutoModelForCausalLM.from_pretrained(PRETRAINED_DIR)
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head) == (4, 256, 4)
    assert config.vocab_size == record["tokenizer_vocab_size"] == len(AutoTokenizer.from_pretrained(PRETRAINED_DIR))


def test_the_script_rebuilds_the_committed_tokenizer_and_first_step(tmp_path: Path) -> None:
    # One step of the same seeded run: same tokenizer, data order, initial weights and first batch.
    config = PretrainConfig(steps=1, log_every=1)
    record = pretrain(tmp_path / "m", config, log=lambda _: None)
    committed = json.loads((PRETRAINED_DIR / RECORD).read_text(encoding="utf-8"))
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (PRETRAINED_DIR / "tokenizer.json").read_bytes()
    assert record["train_tokens"] == committed["train_tokens"]
    # bf16 autocast rounds differently on other CPUs; the same machine gives the same figure.
    assert record["first_step_loss"] == pytest.approx(committed["first_step_loss"], abs=0.02)


def test_install_copies_the_committed_model_once(tmp_path: Path) -> None:
    out = install_pretrained_gpt2(tmp_path / "small")
    assert (out / "model.safetensors").read_bytes() == (PRETRAINED_DIR / "model.safetensors").read_bytes()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert install_pretrained_gpt2(out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    header = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert len(tokenizer(header)["input_ids"]) < 25  # the tokenizer learned the Alpaca header
