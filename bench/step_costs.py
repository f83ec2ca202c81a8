"""What one decoding step of a continuous batch costs by its rows, for each quantization, in this process.

    python bench/step_costs.py [--quantization nf4,bf16,fp32] [--rows 1,2,4,8,16,28] [--steps 8] [--threads 1]

Full-size GPT-2 architecture with random weights (built and cached as bench/inference.py does), greedy, Alpaca
prompts of 36-44 tokens. For each quantization and row count: the rows are admitted into a
worker.continuous.RunningBatch (one prefill), 2 steps warm it, then --steps steps are timed; the table gives the
mean seconds of a step. The worker's own rule for how many batch rows may decode beside an interactive job
(LLMQ_INTERACTIVE_SLOWDOWN, worker/step_costs.py) reads the same curve, measured as it serves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from inference import make_prompts  # bench/inference.py
from measure import loadavg, machine  # bench/measure.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="nf4,bf16,fp32", help="comma-separated: nf4, int8, bf16, fp32")
    parser.add_argument("--rows", default="1,2,4,8,16,28", help="comma-separated row counts")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row count")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the worker's LLMQ_TORCH_THREADS)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmq-bench-cache")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    from transformers import AutoTokenizer

    from worker.continuous import RunningBatch, new_row
    from worker.generation import Request, SamplingParams
    from worker.model_factory import build_full_size_gpt2
    from worker.model_loading import load_base_model

    torch.set_num_threads(args.threads)
    model_dir = build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    counts = [int(n) for n in args.rows.split(",")]
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), max(counts))
    greedy = SamplingParams(max_new_tokens=args.steps + 8, temperature=0)
    start_load = loadavg()
    table: dict[str, list[float]] = {}
    for quantization in args.quantization.split(","):
        loaded = load_base_model(str(model_dir), "main", quantization, "cpu")  # type: ignore[arg-type]
        table[quantization] = []
        for count in counts:
            batch = RunningBatch(loaded)
            batch.admit([new_row(loaded, i, Request(prompts[i], greedy)) for i in range(count)])
            batch.step(), batch.step()
            started = time.perf_counter()
            for _ in range(args.steps):
                batch.step()
            table[quantization].append((time.perf_counter() - started) / args.steps)
    print(f"{machine()}; full-size GPT-2, {args.threads} torch thread(s), {args.steps} steps per count, "
          f"load {start_load:.1f} -> {loadavg():.1f}")  # fmt: skip
    print("| rows | " + " | ".join(str(n) for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for quantization, seconds in table.items():
        print(f"| {quantization} | " + " | ".join(f"{s * 1000:.0f} ms" for s in seconds) + " |")


if __name__ == "__main__":
    main()
