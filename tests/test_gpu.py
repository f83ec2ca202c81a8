"""The CUDA paths, on the real tiny GPT-2: 4-bit load, generation (static, continuous, mixed adapters) and a few
QLoRA training steps. Skipped where no CUDA device is present (every CPU machine); bench/gpu_check.sh runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.fine_tuning import Hyperparameters
from tests.test_adapters import make_adapter
from worker import trainer_setup
from worker.alpaca_data import TrainingData, read_jsonl
from worker.continuous import generate_continuously
from worker.generation import Request, SamplingParams, generate
from worker.model_loading import load_base_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PROMPTS = ["Below is an instruction that describes a task.", "Hello", "The quick brown fox jumps", "Reverse"]
SAMPLE = Path(__file__).resolve().parents[1] / "worker" / "data" / "alpaca_sample.jsonl"


def test_nf4_base_loads_on_cuda_and_generates_greedy_the_same_alone_and_batched(tiny_model: Path) -> None:
    loaded = load_base_model(str(tiny_model), "main", "nf4", "cuda")
    assert loaded.device.type == "cuda"
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    alone = [generate(loaded, [Request(p, greedy)])[0] for p in PROMPTS]
    assert generate(loaded, [Request(p, greedy) for p in PROMPTS]) == alone
    assert all(g.completion_tokens > 0 for g in alone)


def test_continuous_batch_with_mixed_adapters_on_cuda_matches_static_and_seeds_hold(
    tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    loaded = load_base_model(str(tiny_model), "main", "nf4", "cuda")
    names = []
    for i in range(3):
        folder = make_adapter(tiny_model, tmp_path / f"a{i}", seed=i)
        name = f"a{i}"
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(folder), adapter_name=name, is_trainable=False)
        names.append(name)
    loaded.model.eval()
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    requests = [Request(p, greedy, adapter=a) for p in PROMPTS for a in [None, *names]]
    requests += [
        Request(p, SamplingParams(max_new_tokens=6 + i, temperature=1.0, seed=i)) for i, p in enumerate(PROMPTS)
    ]
    alone = [generate(loaded, [r])[0] for r in requests]
    assert generate_continuously(loaded, requests) == alone


def test_a_few_qlora_steps_on_cuda_change_the_lora_weights_only(tiny_model: Path, tmp_path: Path) -> None:
    loaded = load_base_model(str(tiny_model), "main", "nf4", "cuda")
    trainer_setup.keep_4bit_trainable(loaded.model)
    hp = Hyperparameters(batch_size=4, max_seq_len=128, max_steps=3).resolved()
    trainer = trainer_setup.build_trainer(
        loaded, TrainingData(train=read_jsonl(SAMPLE, "sample")[:16], validation=[]), hp, seed=0, output_dir=tmp_path
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    assert next(p for n, p in after.items() if "lora_" in n).device.type == "cuda"
