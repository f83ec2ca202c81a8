"""Fine-tuning throughput: llmq's training path against a seed-style baseline, side by side.

    python bench/train.py [--steps 3] [--warmup 1] [--batch-size 8] [--max-seq-len 256] [--configs ...]

Every configuration trains LoRA (r=16 on c_attn, c_proj, c_fc) on the same 4-bit nf4 base, the full-size
GPT-2 architecture with random weights (worker.model_factory.build_full_size_gpt2, cached under --cache-dir),
with the same batch size and sequence limit, on the same Alpaca-shaped data, each in its own process (so each
peak memory figure is its own), one after another on this machine:

  baseline       seed-style: TRL SFTTrainer on the formatted full text (prompt + response + EOS), padded to a
                 fixed max length, loss on the whole sequence, no packing; TRL's defaults otherwise
                 (activation checkpointing on; bf16=False, the one change CPU needs).
  trl            what a careful TRL user gets on the same data: prompt/completion examples (completion-only
                 loss), dynamic padding, length-grouped batches; bf16 autocast where native and no activation
                 checkpointing, as llmq; TRL's defaults otherwise (its bf16 LoRA weights among them).
  trl+packing    the same with TRL's padding-free best-fit-decreasing packing.
  ours           worker.trainer_setup.build_trainer as a fine-tuning job runs it (default hyperparameters):
                 prompt/completion examples with loss on the response + EOS only, dynamic padding (each batch
                 padded to its longest example) with batches drawn from length-sorted megabatches, no
                 activation checkpointing, bf16 autocast where the CPU has it, fp32 LoRA weights.
  ours/random    the same with plain random batches (dynamic padding alone).
  ours+packing   the same with packing=True (TRL best-fit-decreasing packing, padding-free rows, about
                 batch-size examples per step).

Useful tokens are what a fine-tune is for: response tokens (and each response's EOS) that are not padding,
counted batch by batch from the inputs each step actually ran. All tokens are every position the model ran,
padding included. The first --warmup steps of each configuration are not timed.

--time-to-loss races the fair TRL baseline (trl) and llmq's default (ours) to a validation loss instead: the
project's small pretrained GPT-2 (worker/data/pretrained_gpt2, a model that learns) in nf4, the shipped Alpaca
sample (worker/data/alpaca_sample.jsonl) for training and its held-out file for validation, the same seed and
the same --steps budget for both. Every --eval-every steps both are scored by the same evaluator (this
script's validation_loss: mean cross-entropy over the held-out responses + EOS, token-weighted), its time kept
out of the clock. The target is the loss both reached (the higher of the two best losses); reported is the
training time (wall and CPU) each took to first reach it.

Data: --records synthetic Alpaca-shaped records with Alpaca's length spread (prompt with the Stanford header
about 70 tokens, responses with a median of about 50 tokens and a long tail, 40% with an input), built
deterministically from the project's corpus (worker/data/corpus.txt); or --data FILE.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from measure import loadavg  # bench/measure.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("baseline", "trl", "trl+packing", "ours", "ours/random", "ours+packing")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["c_attn", "c_proj", "c_fc"]}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def synthetic_alpaca(n: int, seed: int) -> list[dict[str, str]]:
    """n Alpaca-shaped records with Alpaca's length spread, made of spans of the shipped corpus's prose."""
    text = (ROOT / "worker" / "data" / "corpus.txt").read_text(encoding="utf-8")
    prose = [p for p in text.split("\n\n\n") if "###" not in p and "{" not in p]
    words = " ".join(prose).split()
    rng = random.Random(seed)

    def span(count: int) -> str:
        start = rng.randrange(0, len(words) - count)
        return " ".join(words[start : start + count])

    def lognormal(median: float, sigma: float, low: int, high: int) -> int:
        return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))

    records = []
    for _ in range(n):
        instruction = span(rng.randint(5, 20)).rstrip(".") + "."
        given = span(lognormal(14, 0.7, 1, 150)) if rng.random() < 0.4 else ""
        output = span(lognormal(38, 0.8, 1, 450))
        records.append({"instruction": instruction[:1].upper() + instruction[1:], "input": given, "output": output})
    return records


# ----------------------------------------------------------------------------------------------------------
# One configuration, in a child process
# ----------------------------------------------------------------------------------------------------------


def run_config(name: str, model_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Trains warmup + steps steps of one configuration; its measured figures."""
    warnings.filterwarnings("ignore")
    import torch
    from transformers import TrainerCallback

    from shared.fine_tuning import Hyperparameters
    from worker.alpaca_data import TrainingData, read_jsonl
    from worker.model_loading import load_base_model
    from worker.trainer_setup import build_trainer, keep_4bit_trainable

    records = read_jsonl(data, data.name)
    validation = read_jsonl(args.validation, args.validation.name) if args.validation else []
    loaded = load_base_model(str(model_dir), "main", "nf4", args.device)
    keep_4bit_trainable(loaded.model)
    tokenizer = loaded.tokenizer
    total_steps = args.warmup + args.steps
    out_dir = Path(tempfile.mkdtemp(prefix="llmq-bench-train-"))

    if name == "baseline":
        trainer = _baseline_trainer(loaded, records, args, total_steps, out_dir)
        useful = _response_lookup(tokenizer, records, args.max_seq_len)

        def count_useful(inputs: dict[str, Any]) -> int:
            rows = [
                ids[mask == 1].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            ]
            return sum(useful[tuple(row)] for row in rows)

    elif name in ("trl", "trl+packing"):
        trainer = _careful_trl_trainer(loaded, records, args, total_steps, out_dir, packing=name == "trl+packing")

        def count_useful(inputs: dict[str, Any]) -> int:
            return int((inputs["labels"] != -100).sum())

    else:
        hp = Hyperparameters(
            batch_size=args.batch_size,
            max_seq_len=args.max_seq_len,
            packing=name == "ours+packing",
            max_steps=total_steps,
            save_every_steps=10**6,
            lora_r=LORA["r"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=LORA["lora_dropout"],
            target_modules=LORA["target_modules"],
        ).resolved()
        trainer = build_trainer(loaded, TrainingData(train=records, validation=[]), hp, 0, output_dir=out_dir)
        if name == "ours/random":
            trainer.args.train_sampling_strategy = "random"

        def count_useful(inputs: dict[str, Any]) -> int:
            return int((inputs["labels"] != -100).sum())

    stats: dict[str, Any] = {"useful": 0, "all": 0, "real": 0, "timing": False, "curve": []}
    original_step = trainer.training_step

    def training_step(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if stats["timing"]:
            stats["useful"] += count_useful(inputs)
            stats["all"] += inputs["input_ids"].numel()
            mask = inputs.get("attention_mask")
            stats["real"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return original_step(model, inputs, num_items_in_batch)

    trainer.training_step = training_step

    class Timer(TrainerCallback):
        def on_step_begin(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == args.warmup:
                stats.update(timing=True, started=time.perf_counter(), cpu_started=time.process_time())
                stats["load_started"] = loadavg()

        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == total_steps:
                stats.update(timing=False, ended=time.perf_counter(), cpu_ended=time.process_time())
                stats["load_ended"] = loadavg()
            if (
                validation
                and stats.get("started")
                and (state.global_step % args.eval_every == 0 or state.global_step == total_steps)
            ):
                wall, cpu = time.perf_counter(), time.process_time()
                loss = validation_loss(trainer.model, tokenizer, validation, args.max_seq_len)
                # the training time so far, then the evaluation's own time moved out of the clock
                stats["curve"].append(
                    {
                        "step": state.global_step,
                        "val_loss": loss,
                        "wall_s": wall - stats["started"],
                        "cpu_s": cpu - stats["cpu_started"],
                    }
                )
                stats["started"] += time.perf_counter() - wall
                stats["cpu_started"] += time.process_time() - cpu
                if state.global_step == total_steps:
                    stats["ended"] = wall
                    stats["cpu_ended"] = cpu

    trainer.add_callback(Timer())
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # the final-step checkpoint the Trainer always writes
    wall = stats["ended"] - stats["started"]
    cpu = stats["cpu_ended"] - stats["cpu_started"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "config": name,
        "steps": args.steps,
        "wall_s": wall,
        "useful_tokens": stats["useful"],
        "all_tokens": stats["all"],
        "real_tokens": stats["real"],
        "useful_tps": stats["useful"] / wall,
        "all_tps": stats["all"] / wall,
        "cpu_s": cpu,
        "useful_per_cpu_s": stats["useful"] / cpu,
        "load": (stats["load_started"] + stats["load_ended"]) / 2,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "curve": stats["curve"],
    }


def validation_loss(model: Any, tokenizer: Any, records: list[dict[str, str]], max_len: int) -> float:
    """Mean cross-entropy over the held-out responses + EOS (prompt tokens not scored), token-weighted: one
    evaluator for every configuration, whatever each trainer computes itself."""
    import torch

    from worker.alpaca_data import to_examples

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in to_examples(records):
            prompt = tokenizer(example["prompt"])["input_ids"]
            full = (prompt + tokenizer(example["completion"])["input_ids"] + [tokenizer.eos_token_id])[:max_len]
            if len(full) <= len(prompt):
                continue
            ids = torch.tensor([full], device=model.device)
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            scored = len(full) - len(prompt)
            total += float(model(input_ids=ids, labels=labels).loss) * scored
            count += scored
    if was_training:
        model.train()
    return total / count


def _baseline_trainer(
    loaded: Any, records: list[dict[str, str]], args: argparse.Namespace, steps: int, out: Path
) -> Any:
    """Seed-style: TRL SFTTrainer on full text, fixed-length padding, whole-sequence loss, TRL defaults."""
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from worker.alpaca_data import to_examples

    model = prepare_model_for_kbit_training(loaded.model)  # its default: activation checkpointing on
    texts = [{"text": e["prompt"] + e["completion"]} for e in to_examples(records)]
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_seq_len,
        pad_to_multiple_of=args.max_seq_len,  # every row padded to the fixed max length
        packing=False,
        bf16=False,  # SFTConfig's bf16 default fails on CPU
        learning_rate=2e-4,
        max_steps=steps,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(texts),
        processing_class=loaded.tokenizer,
        peft_config=LoraConfig(**LORA, fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )


def _careful_trl_trainer(
    loaded: Any, records: list[dict[str, str]], args: argparse.Namespace, steps: int, out: Path, packing: bool
) -> Any:
    """What a careful TRL user configures on the same data: prompt/completion examples (TRL's completion-only
    loss), dynamic padding with length-grouped batches, or padding-free packing; bf16 autocast where the
    hardware has it and no activation checkpointing (the model fits), as llmq; TRL's defaults otherwise."""
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from worker.alpaca_data import to_examples
    from worker.trainer_setup import mixed_precision

    model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    bf16, fp16 = mixed_precision(loaded.device)
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_seq_len,
        completion_only_loss=True,
        packing=packing,
        padding_free=packing,
        train_sampling_strategy="random" if packing else "group_by_length",
        activation_checkpointing=False,
        bf16=bf16,
        fp16=fp16,
        use_cpu=loaded.device.type == "cpu",
        learning_rate=2e-4,
        max_steps=steps,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(to_examples(records)),
        processing_class=loaded.tokenizer,
        peft_config=LoraConfig(**LORA, fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )


def _response_lookup(tokenizer: Any, records: list[dict[str, str]], max_len: int) -> dict[tuple[int, ...], int]:
    """Full token sequence (as the baseline trains it, truncated) -> response tokens + EOS within it."""
    from worker.alpaca_data import to_examples

    lookup = {}
    for example in to_examples(records):
        full = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"][:max_len]
        prompt = len(tokenizer(example["prompt"])["input_ids"])
        lookup[tuple(full)] = max(0, len(full) - prompt)
    return lookup


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def run_child(name: str, model_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """One configuration in its own process (so its peak memory is its own); its figures, None if it failed."""
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--data", str(data)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    command += ["--max-seq-len", str(args.max_seq_len), "--device", args.device, "--eval-every", str(args.eval_every)]
    if args.validation:
        command += ["--validation", str(args.validation)]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"  {name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def race_to_loss(args: argparse.Namespace, model_dir: Path) -> int:
    """trl against ours to the validation loss both reach, same seed, data and steps budget; prints the table."""
    shipped = ROOT / "worker" / "data"
    data = args.data or shipped / "alpaca_sample.jsonl"
    args.validation = args.validation or shipped / "alpaca_sample_val.jsonl"
    configs = [c for c in args.configs if c != "baseline"] if args.configs != list(CONFIGS) else ["trl", "ours"]
    print(f"model: llmq's small pretrained GPT-2 ({model_dir.name}), nf4 + LoRA r={LORA['r']}, {os.cpu_count()} CPUs")
    print(f"data: {describe_data(model_dir, data)}; validation: {args.validation.name}")
    print(
        f"batch {args.batch_size}, max_seq_len {args.max_seq_len}, {args.steps} steps, scored every {args.eval_every}\n"
    )
    results = []
    for name in configs:
        result = run_child(name, model_dir, data, args)
        if result is None:
            return 1
        results.append(result)
    target = max(min(point["val_loss"] for point in r["curve"]) for r in results)
    print(f"target validation loss: {target:.3f} (the higher of the best losses reached)\n")
    print("| config | first score | best val loss | steps to target | wall s to target | CPU s to target | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reached = {}
    for r in results:
        hit = next(point for point in r["curve"] if point["val_loss"] <= target)
        reached[r["config"]] = hit
        print(
            f"| {r['config']} | {r['curve'][0]['val_loss']:.3f} | {min(p['val_loss'] for p in r['curve']):.3f} "
            f"| {hit['step']} | {hit['wall_s']:.1f} | {hit['cpu_s']:.1f} | {r['load']:.1f} |"
        )
    if "trl" in reached and "ours" in reached:
        print(
            f"\nours / trl time to target: wall {reached['ours']['wall_s'] / reached['trl']['wall_s']:.2f}x, "
            f"CPU {reached['ours']['cpu_s'] / reached['trl']['cpu_s']:.2f}x (below 1 = ours sooner)"
        )
    return 0


def describe_data(model_dir: Path, data: Path) -> str:
    from transformers import AutoTokenizer

    from worker.alpaca_data import read_jsonl, to_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = to_examples(read_jsonl(data, data.name))
    prompts = [len(tokenizer(e["prompt"])["input_ids"]) for e in examples]
    responses = [len(tokenizer(e["completion"])["input_ids"]) + 1 for e in examples]
    totals = [p + r for p, r in zip(prompts, responses, strict=True)]

    def spread(values: list[int]) -> str:
        p95 = statistics.quantiles(values, n=20)[-1]
        mean, median = statistics.mean(values), statistics.median(values)
        return f"mean {mean:.0f}, median {median:.0f}, p95 {p95:.0f}, max {max(values)}"

    return (
        f"{len(examples)} records; tokens per example: prompt {spread(prompts)}; response+EOS {spread(responses)}; "
        f"total {spread(totals)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/train.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, help="timed optimizer steps per configuration (default 3; 60 with --time-to-loss)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--records", type=int, default=2000, help="synthetic records (unless --data)")
    parser.add_argument("--data", type=Path, help="a JSONL of Alpaca records instead of synthetic ones")
    parser.add_argument("--validation", type=Path, help="held-out Alpaca JSONL, scored every --eval-every steps")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between validation scores")
    parser.add_argument(
        "--time-to-loss",
        action="store_true",
        help="race trl and ours to a validation loss on the small pretrained GPT-2 and the shipped sample",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmq-bench-cache")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every configuration trains")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.time_to_loss else 3)

    if args.child:
        print("RESULT " + json.dumps(run_config(args.child, args.model_dir, args.data, args)), flush=True)
        return 0

    from worker.model_factory import build_full_size_gpt2, install_pretrained_gpt2

    if args.time_to_loss:
        return race_to_loss(args, install_pretrained_gpt2(args.cache_dir / "small-gpt2"))

    model_dir = build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    data = args.data
    if data is None:
        data = args.cache_dir / f"alpaca-synthetic-{args.records}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_alpaca(args.records, seed=0)))
    print(f"model: GPT-2 124M architecture, random weights, nf4 + LoRA r={LORA['r']}, {os.cpu_count()} CPUs")
    print(f"data: {describe_data(model_dir, data)}")
    print(
        f"batch {args.batch_size}, max_seq_len {args.max_seq_len}, {args.warmup} warm-up + {args.steps} timed steps\n"
    )

    results = []
    for name in args.configs:
        result = run_child(name, model_dir, data, args)
        if result is None:
            return 1
        results.append(result)

    base = next((r for r in results if r["config"] == "baseline"), None)
    careful = next((r for r in results if r["config"] == "trl"), None)  # the fair baseline
    print(
        "| config | steps | wall s | useful tokens/s | all tokens/s | padding % | peak MB | useful vs baseline "
        "| useful tokens/CPU-s | vs baseline (CPU) | vs trl (CPU) | load avg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        padding = 100 * (1 - r["real_tokens"] / r["all_tokens"]) if r["all_tokens"] else 0.0
        ratio = f"{r['useful_tps'] / base['useful_tps']:.2f}x" if base else "-"
        cpu_ratio = f"{r['useful_per_cpu_s'] / base['useful_per_cpu_s']:.2f}x" if base else "-"
        fair_ratio = f"{r['useful_per_cpu_s'] / careful['useful_per_cpu_s']:.2f}x" if careful else "-"
        print(
            f"| {r['config']} | {r['steps']} | {r['wall_s']:.1f} | {r['useful_tps']:.0f} | {r['all_tps']:.0f} "
            f"| {padding:.0f} | {r['peak_mb']:.0f} | {ratio} | {r['useful_per_cpu_s']:.0f} | {cpu_ratio} "
            f"| {fair_ratio} | {r['load']:.1f} |"
        )
    print(
        "\nuseful = response + EOS tokens trained on; all = every position run, padding included; "
        "CPU-s = this process's CPU time (all threads), steadier than wall time when other work shares the CPUs; "
        "load avg = 1-minute load average during the timed steps."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
