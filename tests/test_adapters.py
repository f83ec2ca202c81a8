"""Serving LoRA adapters on one base model: per-row adapters in a batch, LRU, safetensors only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from worker.adapters import AdapterCache, UnsafeAdapter
from worker.generation import Request, SamplingParams, generate
from worker.model_loading import load_base_model

PROMPTS = ["Below is an instruction that describes a task.", "Hello", "The quick brown fox"]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as safetensors."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {f"ft:tiny:a{i}:job{i}": make_adapter(tiny_model, root / f"a{i}", seed=i) for i in range(3)}


@pytest.mark.parametrize("quantization", ["nf4", "fp32"])
def test_mixed_adapter_batch_is_token_identical_to_each_alone(
    tiny_model: Path, adapters: dict[str, Path], quantization: str
) -> None:
    loaded = load_base_model(str(tiny_model), "main", quantization, "cpu")  # type: ignore[arg-type]
    cache = AdapterCache(loaded, capacity=4)
    names = cache.ensure(adapters)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    requests = [
        Request(p, greedy, adapter=a) for p in PROMPTS for a in [None, *names.values()]
    ]  # every prompt on the base and on each adapter, all in one batch
    batched = generate(loaded, requests)
    alone = [generate(loaded, [r])[0] for r in requests]
    assert batched == alone
    base_texts = {r.prompt: g.text for r, g in zip(requests, batched, strict=True) if r.adapter is None}
    adapted = [g.text for r, g in zip(requests, batched, strict=True) if r.adapter is not None]
    assert any(text not in base_texts.values() for text in adapted)  # adapters change the output


def test_least_recently_used_adapter_is_evicted(tiny_model: Path, adapters: dict[str, Path]) -> None:
    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    cache = AdapterCache(loaded, capacity=2)
    a0, a1, a2 = adapters
    cache.ensure({a0: adapters[a0]})
    cache.ensure({a1: adapters[a1]})
    cache.ensure({a0: adapters[a0]})  # a0 is now the most recently used
    cache.ensure({a2: adapters[a2]})
    assert cache.names == [a0, a2]
    assert set(loaded.model.peft_config) == {cache.ensure({a0: adapters[a0]})[a0], cache.ensure({a2: adapters[a2]})[a2]}


def test_adapter_without_safetensors_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    cache = AdapterCache(load_base_model(str(tiny_model), "main", "fp32", "cpu"), capacity=2)
    with pytest.raises(UnsafeAdapter):
        cache.ensure({"ft:x": folder})
