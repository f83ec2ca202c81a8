"""Serving LoRA adapters on one base model: per-row adapters in a batch, LRU, safetensors only; the local disk
cache they are loaded from (fetched from the artifact store, checked against the manifest, bounded, LRU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from shared import artifacts
from shared.artifacts import ADAPTER_SEAL, ArtifactStore, ChecksumMismatch
from worker.adapter_cache import AdapterDiskCache, StoredAdapter
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


def publish(store: ArtifactStore, folder: Path, job_id: str) -> StoredAdapter:
    """Stores an adapter folder as a fine-tune publishes it (files, then the manifest listing them)."""
    key = artifacts.adapter_key(job_id, 1)
    return StoredAdapter(key=key, files=store.put_sealed(folder, key, ADAPTER_SEAL, {"fine_tuned_model": job_id}))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("store").as_uri(), {"auto_mkdir": True})


@pytest.fixture(scope="module")
def adapters(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, store: ArtifactStore
) -> dict[str, StoredAdapter]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        f"ft:tiny:a{i}:job{i}": publish(store, make_adapter(tiny_model, root / f"a{i}", seed=i), f"job{i}")
        for i in range(3)
    }


def disk_cache(store: ArtifactStore, folder: Path, max_bytes: int = 2**30) -> AdapterDiskCache:
    return AdapterDiskCache(store, folder, max_bytes)


NF4_LOGPROB_TOLERANCE = 0.02  # nats; measured differences are under 0.004 (bf16 keeps ~3 significant digits)


@pytest.mark.parametrize("quantization", ["nf4", "fp32"])
def test_mixed_adapter_batch_is_token_identical_to_each_alone(
    tiny_model: Path, adapters: dict[str, StoredAdapter], quantization: str, store: ArtifactStore, tmp_path: Path
) -> None:
    loaded = load_base_model(str(tiny_model), "main", quantization, "cpu")  # type: ignore[arg-type]
    cache = AdapterCache(loaded, capacity=4, disk=disk_cache(store, tmp_path))
    names = cache.ensure(adapters)
    # fp32: greedy tokens are identical. nf4 computes in bf16, whose rounding depends on the batch's shape
    # on some CPUs (no AVX512-BF16): a random model's near-flat distribution then breaks ties differently, so
    # there the first step's five likeliest log probabilities must agree instead of the tokens.
    exact = quantization == "fp32"
    params = SamplingParams(max_new_tokens=8 if exact else 1, temperature=0, logprobs=None if exact else 5)
    requests = [
        Request(p, params, adapter=a) for p in PROMPTS for a in [None, *names.values()]
    ]  # every prompt on the base and on each adapter, all in one batch
    batched = generate(loaded, requests)
    alone = [generate(loaded, [r])[0] for r in requests]
    if exact:
        assert batched == alone
    else:
        for b, a in zip(batched, alone, strict=True):
            assert b.logprobs and a.logprobs
            top_b = sorted(t.logprob for t in b.logprobs[0].top_logprobs)
            top_a = sorted(t.logprob for t in a.logprobs[0].top_logprobs)
            assert top_b == pytest.approx(top_a, abs=NF4_LOGPROB_TOLERANCE)
    base_texts = {r.prompt: g.text for r, g in zip(requests, batched, strict=True) if r.adapter is None}
    adapted = [g.text for r, g in zip(requests, batched, strict=True) if r.adapter is not None]
    assert any(text not in base_texts.values() for text in adapted)  # adapters change the output


def test_least_recently_used_adapter_is_evicted(
    tiny_model: Path, adapters: dict[str, StoredAdapter], store: ArtifactStore, tmp_path: Path
) -> None:
    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    cache = AdapterCache(loaded, capacity=2, disk=disk_cache(store, tmp_path))
    a0, a1, a2 = adapters
    cache.ensure({a0: adapters[a0]})
    cache.ensure({a1: adapters[a1]})
    cache.ensure({a0: adapters[a0]})  # a0 is now the most recently used
    cache.ensure({a2: adapters[a2]})
    assert cache.names == [a0, a2]
    assert set(loaded.model.peft_config) == {cache.ensure({a0: adapters[a0]})[a0], cache.ensure({a2: adapters[a2]})[a2]}


def test_adapter_without_safetensors_is_refused(tiny_model: Path, tmp_path: Path, store: ArtifactStore) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    stored = publish(store, folder, "pickled")
    cache = AdapterCache(
        load_base_model(str(tiny_model), "main", "fp32", "cpu"), capacity=2, disk=disk_cache(store, tmp_path / "cache")
    )
    with pytest.raises(UnsafeAdapter):
        cache.ensure({"ft:x": stored})
    legacy = StoredAdapter(key=stored.key, files=None)  # a manifest from before file lists: checked on disk
    with pytest.raises(UnsafeAdapter):
        cache.ensure({"ft:x": legacy})


def test_disk_cache_fetches_once_then_hits_and_keeps_within_its_size_by_lru(
    store: ArtifactStore, adapters: dict[str, StoredAdapter], tmp_path: Path
) -> None:
    a0, a1, a2 = adapters.values()
    one = sum(f["bytes"] for f in (a0.files or {}).values())
    cache = disk_cache(store, tmp_path, max_bytes=2 * one)  # room for two adapters
    for adapter in (a0, a1, a0, a2):  # a0 used again after a1, so a1 is the least recently used
        with cache.local_copy(adapter) as folder:
            assert (folder / "adapter_model.safetensors").is_file()
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evicted) == (1, 3, 1)
    held = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert held == sorted(a.key.replace("/", "__") for a in (a0, a2))
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 2 * one


def test_disk_cache_refuses_a_file_whose_checksum_is_not_the_manifests_and_keeps_nothing(
    store: ArtifactStore, adapters: dict[str, StoredAdapter], tmp_path: Path
) -> None:
    a0 = next(iter(adapters.values()))
    files = {name: dict(entry) for name, entry in (a0.files or {}).items()}
    files["adapter_model.safetensors"]["sha256"] = "0" * 64  # the store's file is not what the manifest says
    cache = disk_cache(store, tmp_path)
    with pytest.raises(ChecksumMismatch), cache.local_copy(StoredAdapter(key=a0.key, files=files)):
        pass
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # nothing half-fetched is left to be loaded
