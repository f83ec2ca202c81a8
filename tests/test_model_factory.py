"""The offline model factory and the data the project ships (worker/data/). No network is touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker import model_factory
from worker.model_factory import (
    BUILD_MARKER,
    build_full_size_gpt2,
    build_tiny_gpt2,
    corpus_paths,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "worker" / "data"

HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny")


def _file_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(directory.iterdir())}


def test_tiny_model_builds_reloads_and_generates(tiny_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    assert (tiny_dir / BUILD_MARKER).is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.eval()

    assert model.config.model_type == "gpt2"
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 128, 2)
    assert model.config.vocab_size == len(tokenizer) == 2048
    eos = tokenizer.eos_token_id
    assert eos is not None
    assert tokenizer.convert_ids_to_tokens(eos) == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == eos
    assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == eos
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == eos
    assert tokenizer.model_max_length == model.config.n_positions == 512

    tokenizer.padding_side = "left"
    batch = tokenizer(["Reverse the following list of words.", "red"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2
    assert 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5
    assert int(out.max()) < model.config.vocab_size
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_tokenizer_round_trips_and_learned_the_alpaca_headers(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = HEADER_WITH_INPUT.format(instruction="Spell fox backwards.", input="naïve café 🙂\ttabs")
    for text in (prompt, HEADER_NO_INPUT, " leading space", "trailing\n\n", "x" * 50):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    # No BOS/EOS added on encode (GPT-2 behaviour): the trainer appends EOS itself.
    assert tokenizer("red")["input_ids"] == tokenizer.encode("red", add_special_tokens=True)
    assert tokenizer.eos_token_id not in tokenizer("red blue")["input_ids"]
    # Merges were learned on the shipped corpus: the headers cost a word per token, not a byte per token.
    for header in (HEADER_NO_INPUT, HEADER_WITH_INPUT):
        assert len(tokenizer(header)["input_ids"]) < len(header) / 3
    # The special token in text is the special token.
    assert tokenizer("a<|endoftext|>")["input_ids"][-1] == tokenizer.eos_token_id


def test_train_tokenizer_respects_vocab_bound(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(corpus_paths(), 600)
    assert len(tokenizer) == 600
    assert max(tokenizer.get_vocab().values()) == 599
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("### Response:")["input_ids"] == tokenizer("### Response:")["input_ids"]
    with pytest.raises(ValueError):
        train_tokenizer(corpus_paths(), 100)


def test_build_is_idempotent(tiny_dir: Path) -> None:
    before = _file_stats(tiny_dir)
    assert build_tiny_gpt2(tiny_dir) == tiny_dir
    assert _file_stats(tiny_dir) == before


def test_build_is_deterministic_per_seed(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_gpt2(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_build_replaces_a_stale_or_partial_directory(tmp_path: Path) -> None:
    out = tmp_path / "m"
    build_tiny_gpt2(out, n_layer=1)
    marker = json.loads((out / BUILD_MARKER).read_text())
    assert marker["params"]["n_layer"] == 1
    (out / "unrelated.txt").write_text("keep me")

    build_tiny_gpt2(out)  # different arguments: rebuilt in place
    marker = json.loads((out / BUILD_MARKER).read_text())
    assert marker["params"]["n_layer"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2
    assert (out / "unrelated.txt").read_text() == "keep me"

    (out / "model.safetensors").unlink()  # an interrupted copy: not complete, so rebuilt
    build_tiny_gpt2(out)
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_build_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_gpt2(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_cli_prints_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert model_factory.main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / BUILD_MARKER).read_text())["kind"] == "tiny"


@pytest.mark.slow
def test_full_size_model(tmp_path: Path) -> None:
    out = build_full_size_gpt2(tmp_path / "full")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (12, 768, 12, 1024)
    assert config.vocab_size == 50257
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert len(tokenizer) > 2048
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    assert tokenizer.eos_token_id is not None
    assert 0 <= tokenizer.eos_token_id < config.vocab_size
    assert config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 1024
    with torch.no_grad():
        logits = model(**tokenizer(HEADER_NO_INPUT, return_tensors="pt")).logits
    assert logits.shape[-1] == 50257
    before = _file_stats(out)
    build_full_size_gpt2(out)
    assert _file_stats(out) == before


# ----------------------------------------------------------------------------------------------------------
# Shipped data
# ----------------------------------------------------------------------------------------------------------


def _records(name: str) -> list[dict[str, str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("name", "low", "high"), [("alpaca_sample.jsonl", 350, 450), ("alpaca_sample_val.jsonl", 50, 80)]
)
def test_shipped_datasets_parse(name: str, low: int, high: int) -> None:
    records = _records(name)
    assert low <= len(records) <= high
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(record[key], str) for key in record)
        assert record["instruction"] and record["output"]
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_validation_records_are_held_out() -> None:
    train = {json.dumps(r, sort_keys=True) for r in _records("alpaca_sample.jsonl")}
    val = [json.dumps(r, sort_keys=True) for r in _records("alpaca_sample_val.jsonl")]
    assert not train.intersection(val)
    assert len(set(val)) == len(val)


def test_shipped_examples_fit_a_tiny_context(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    lengths = [len(tokenizer(r["output"])["input_ids"]) for r in _records("alpaca_sample.jsonl")]
    assert min(lengths) <= 3 and max(lengths) >= 80  # mixed lengths, from one word to long lists
    assert max(lengths) + 100 < tokenizer.model_max_length


def test_corpus_contains_both_headers() -> None:
    (path,) = corpus_paths()
    text = path.read_text(encoding="utf-8")
    assert text.count(HEADER_WITH_INPUT) >= 5
    assert text.count(HEADER_NO_INPUT) >= 5
    assert len(text.encode()) < 400_000


def test_sample_data_script_reproduces_the_shipped_files() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_sample_data.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
