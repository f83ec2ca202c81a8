"""Decode-step attention on the CPU: SDPA against eager, side by side on the same batches.

    python bench/decode_attention.py [--rounds 6] [--batch 32] [--max-tokens 32]

Full-size GPT-2 architecture with random weights (built and cached as bench/inference.py does), nf4, greedy,
Alpaca prompts of 36-44 tokens. Each round runs the same batch through worker.generation.generate twice:
decode steps on SDPA (the prompt pass is SDPA in both) and decode steps on eager attention (what the worker
does on a CPU), alternating which goes first. Reports tokens/s of each and the median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from inference import make_prompts  # bench/inference.py
from measure import loadavg  # bench/measure.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmq-bench-cache")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    from transformers import AutoTokenizer

    from worker import generation
    from worker.model_factory import build_full_size_gpt2
    from worker.model_loading import load_base_model

    model_dir = build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    loaded = load_base_model(str(model_dir), "main", "nf4", "cpu")
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), args.batch)
    greedy = generation.SamplingParams(max_new_tokens=args.max_tokens, temperature=0)
    requests = [generation.Request(p, greedy) for p in prompts]
    chosen = generation._decode_attention

    def run(decode: str) -> float:
        generation._decode_attention = chosen if decode == "eager" else (lambda _loaded, prefill: prefill)  # type: ignore[assignment]
        try:
            started = time.perf_counter()
            outputs = generation.generate(loaded, requests)
            return sum(o.completion_tokens for o in outputs) / (time.perf_counter() - started)
        finally:
            generation._decode_attention = chosen  # type: ignore[assignment]

    run("sdpa"), run("eager")  # warm-up
    start_load = loadavg()
    rates: dict[str, list[float]] = {"sdpa": [], "eager": []}
    for i in range(args.rounds):
        for decode in ("sdpa", "eager") if i % 2 == 0 else ("eager", "sdpa"):
            rates[decode].append(run(decode))
    ratios = [e / s for e, s in zip(rates["eager"], rates["sdpa"], strict=True)]
    print(f"full-size GPT-2, nf4, batch {args.batch}, {args.max_tokens} new tokens, {args.rounds} rounds, "
          f"load {start_load:.1f} -> {loadavg():.1f}")  # fmt: skip
    print("| decode attention | median tok/s | per round |")
    print("|---|---|---|")
    for decode, values in rates.items():
        print(f"| {decode} | {statistics.median(values):.0f} | {' '.join(f'{v:.0f}' for v in values)} |")
    print(f"eager / sdpa, median of per-round ratios: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
