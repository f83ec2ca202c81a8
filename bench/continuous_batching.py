"""Continuous against static batching, and grouped LoRA against peft's mixed batch, side by side in one run.

    python bench/continuous_batching.py [--quick] [--quantization nf4|int8|bf16|fp32] [--requests N]
    (also: python bench/inference.py --workload mixed ...)

In process, one loaded model: the full-size GPT-2 architecture with random weights (costs what GPT-2 costs),
greedy decoding, Alpaca prompts of about 40 tokens, at most --batch rows decoding together. Both schedulers
see the same requests arriving at the same times:

  static      when idle, take up to --batch waiting requests and run them with worker.generation.generate
              until the longest ends (what the static worker does per claimed batch);
  continuous  worker.continuous.RunningBatch: waiting requests join at every step while there is room,
              and rows leave the step they end (what worker.scheduler does with claimed jobs).

Workloads:
  unloaded    one 16-token request alone: the latency the loaded figures are compared with.
  mixed, saturating   --requests requests, max_tokens drawn from --lengths (16/64/256), Poisson arrivals faster than
              either scheduler serves them: tokens/s is each scheduler's capacity on mixed lengths.
  mixed, under load   the same mix at --load x the static capacity just measured: latency of 16-token jobs.
  uniform     --requests requests of 32 tokens, all waiting at the start (today's uniform workload).
  adapters    32 rows x 32 tokens: base, 1 LoRA adapter, 4 and 16 adapters mixed; continuous with grouped
              LoRA (worker.grouped_lora) and static through peft's adapter_names.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
from measure import log, machine, pct


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    prompt: str
    max_tokens: int
    adapter: str | None = None


@dataclass
class Outcome:
    """One scheduler's run of one workload."""

    tokens: int
    seconds: float  # first arrival -> last finish
    latency: dict[int, list[float]]  # max_tokens -> arrival-to-finish seconds of each request

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def p50(self, max_tokens: int) -> float:
        return pct(self.latency[max_tokens], 50)


def poisson(prompts: Sequence[str], count: int, rate: float, lengths: Sequence[int], seed: int) -> list[Arrival]:
    """count requests, exponential gaps of mean 1/rate (rate 0: all at once), max_tokens drawn from lengths."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for i in range(count):
        out.append(Arrival(at, prompts[i % len(prompts)], rng.choice(lengths)))
        at += rng.expovariate(rate) if rate > 0 else 0.0
    return out


def _wait_for(arrival: float, started: float) -> None:
    delay = arrival - (time.perf_counter() - started)
    if delay > 0:
        time.sleep(delay)


def run_static(loaded: Any, workload: Sequence[Arrival], batch: int) -> Outcome:
    from worker.generation import Request, SamplingParams, generate

    pending, queue = deque(workload), deque[Arrival]()
    latency: dict[int, list[float]] = {}
    tokens, started = 0, time.perf_counter()
    while pending or queue:
        now = time.perf_counter() - started
        while pending and pending[0].at <= now:
            queue.append(pending.popleft())
        if not queue:
            _wait_for(pending[0].at, started)
            continue
        take = [queue.popleft() for _ in range(min(batch, len(queue)))]
        requests = [
            Request(a.prompt, SamplingParams(max_new_tokens=a.max_tokens, temperature=0), a.adapter) for a in take
        ]
        generations = generate(loaded, requests)
        done = time.perf_counter() - started
        for a, g in zip(take, generations, strict=True):
            latency.setdefault(a.max_tokens, []).append(done - a.at)
            tokens += g.completion_tokens
    return Outcome(tokens, time.perf_counter() - started - workload[0].at, latency)


def run_continuous(loaded: Any, workload: Sequence[Arrival], batch: int) -> Outcome:
    from worker.continuous import RunningBatch, new_row
    from worker.generation import Request, SamplingParams

    pending, queue = deque(workload), deque[Arrival]()
    running = RunningBatch(loaded)
    latency: dict[int, list[float]] = {}
    tokens, started = 0, time.perf_counter()

    def finish() -> int:
        done, count = time.perf_counter() - started, 0
        for row in running.take_finished():
            a: Arrival = row.key  # type: ignore[assignment]
            latency.setdefault(a.max_tokens, []).append(done - a.at)
            count += len(row.generated)
        return count

    while pending or queue or len(running):
        now = time.perf_counter() - started
        while pending and pending[0].at <= now:
            queue.append(pending.popleft())
        room = batch - len(running)
        if queue and room > 0:
            take = [queue.popleft() for _ in range(min(room, len(queue)))]
            running.admit([new_row(loaded, a, Request(a.prompt, SamplingParams(max_new_tokens=a.max_tokens,
                                                                               temperature=0), a.adapter))
                           for a in take])  # fmt: skip
            tokens += finish()
        if not len(running):
            if pending and not queue:
                _wait_for(pending[0].at, started)
            continue
        running.step()
        tokens += finish()
    return Outcome(tokens, time.perf_counter() - started - workload[0].at, latency)


Runner = Callable[[Any, Sequence[Arrival], int], Outcome]


def side_by_side(loaded: Any, workload: Sequence[Arrival], batch: int, name: str) -> tuple[Outcome, Outcome]:
    static = run_static(loaded, workload, batch)
    log(f"{name}, static: {static.tokens_per_s:.0f} tokens/s in {static.seconds:.1f} s")
    continuous = run_continuous(loaded, workload, batch)
    log(f"{name}, continuous: {continuous.tokens_per_s:.0f} tokens/s in {continuous.seconds:.1f} s")
    return static, continuous


def adapter_rows(loaded: Any, prompts: list[str], names: list[str | None], batch: int, max_tokens: int,
                 rounds: int) -> tuple[float, float]:  # fmt: skip
    """tokens/s of (continuous + grouped LoRA, static + peft adapter_names) on batches whose row i uses names[i % n]."""
    from worker.continuous import generate_continuously
    from worker.generation import Request, SamplingParams, generate

    greedy = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    requests = [Request(prompts[i % len(prompts)], greedy, names[i % len(names)]) for i in range(batch)]
    out = []
    for run in (generate_continuously, generate):
        run(loaded, requests[:4])  # warm
        started, tokens = time.perf_counter(), 0
        for _ in range(rounds):
            tokens += sum(g.completion_tokens for g in run(loaded, requests))
        out.append(tokens / (time.perf_counter() - started))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a few minutes)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmq-bench-cache")
    parser.add_argument("--requests", type=int, help="requests per mixed/uniform run (default 96, quick 48)")
    parser.add_argument("--batch", type=int, default=32, help="most rows decoding together")
    parser.add_argument("--load", type=float, default=0.5, help="'under load' rate, as a share of static capacity")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--skip-adapters", action="store_true")
    parser.add_argument(
        "--lengths", default="16,64,256", help="max_tokens to draw from (the first one is the short job)"
    )
    parser.add_argument("--adapter-rounds", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, help="another model than the full-size GPT-2 (a smoke run)")
    args = parser.parse_args(argv)
    count = args.requests or (48 if args.quick else 96)
    lengths = tuple(int(n) for n in args.lengths.split(","))
    short = lengths[0]
    os.environ["HF_HUB_OFFLINE"] = "1"

    from inference import load_adapters, make_adapters, make_prompts  # bench/inference.py

    from worker.model_factory import build_full_size_gpt2
    from worker.model_loading import load_base_model

    model_dir = args.model_dir or build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    loaded = load_base_model(str(model_dir), "main", args.quantization, args.device)
    prompts = make_prompts(loaded.tokenizer, 64)
    batch = args.batch

    run_continuous(loaded, poisson(prompts, 8, 0, (4,), 0), batch)  # warm (the first 4-bit forward repacks)
    alone = [run_continuous(loaded, [Arrival(0.0, prompts[i], short)], batch).p50(short) for i in range(3)]
    unloaded = statistics.median(alone)
    log(f"unloaded {short}-token latency {unloaded * 1000:.0f} ms")

    saturating = poisson(prompts, count, 1000.0, lengths, seed=1)
    sat_static, sat_cont = side_by_side(loaded, saturating, batch, "mixed, saturating")
    mean_tokens = statistics.mean(lengths)
    rate = args.load * sat_static.tokens_per_s / mean_tokens
    loaded_mix = poisson(prompts, count, rate, lengths, seed=2)
    load_static, load_cont = side_by_side(loaded, loaded_mix, batch, f"mixed, {rate:.2f} requests/s")
    uniform = poisson(prompts, count, 0, (32,), seed=3)
    uni_static, uni_cont = side_by_side(loaded, uniform, batch, "uniform")

    adapters: list[tuple[str, float, float]] = []
    if not args.skip_adapters:
        folders = make_adapters(
            model_dir, args.cache_dir / f"adapters-{model_dir.name}-r{args.lora_rank}-16", 16, args.lora_rank
        )
        names: list[str | None] = list(load_adapters(loaded, folders))
        rounds = args.adapter_rounds
        for label, pick in [("base model", [None]), ("1 adapter", names[:1]), ("4 adapters mixed", names[:4]),
                            ("16 adapters mixed", names)]:  # fmt: skip
            grouped, peft = adapter_rows(loaded, prompts, pick, batch, 32, rounds)
            log(f"adapters, {label}: grouped {grouped:.0f}, peft {peft:.0f} tokens/s")
            adapters.append((label, grouped, peft))

    print(report(args, lengths, count, unloaded, rate, (sat_static, sat_cont), (load_static, load_cont),
                 (uni_static, uni_cont), adapters))  # fmt: skip


def report(args: argparse.Namespace, lengths: tuple[int, ...], count: int, unloaded: float, rate: float,
           saturating: tuple[Outcome, Outcome], under_load: tuple[Outcome, Outcome], uniform: tuple[Outcome, Outcome],
           adapters: list[tuple[str, float, float]]) -> str:  # fmt: skip
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.0f} ms"

    model = f"model {args.model_dir}" if args.model_dir else "full-size GPT-2, random weights"

    lines = [
        f"## Continuous vs static batching ({args.quantization}, {model}, {args.device})",
        "",
        f"{machine()}; {count} requests per run, at most {args.batch} rows together, greedy, prompts of about 40 "
        f"tokens; max_tokens drawn from {'/'.join(map(str, lengths))}.",
        "",
        "| workload | static | continuous | continuous / static |",
        "|---|---|---|---|",
    ]
    s, c = saturating
    lines.append(f"| mixed, saturating: tokens/s | {s.tokens_per_s:.0f} | {c.tokens_per_s:.0f} | "
                 f"{c.tokens_per_s / s.tokens_per_s:.2f}x |")  # fmt: skip
    for n in lengths:
        lines.append(f"| mixed, saturating: p50 of {n}-token jobs | {ms(s.p50(n))} | {ms(c.p50(n))} | "
                     f"{c.p50(n) / s.p50(n):.2f}x |")  # fmt: skip
    s, c = under_load
    lines.append(f"| mixed at {rate:.2f} req/s ({args.load:.0%} of static capacity): tokens/s | {s.tokens_per_s:.0f} | "
                 f"{c.tokens_per_s:.0f} | {c.tokens_per_s / s.tokens_per_s:.2f}x |")  # fmt: skip
    for n in lengths:
        lines.append(f"| mixed at {rate:.2f} req/s: p50 of {n}-token jobs | {ms(s.p50(n))} | {ms(c.p50(n))} | "
                     f"{c.p50(n) / s.p50(n):.2f}x |")  # fmt: skip
    short = lengths[0]
    lines.append(f"| {short}-token p50 under load / unloaded ({ms(unloaded)}) | {s.p50(short) / unloaded:.1f}x | "
                 f"{c.p50(short) / unloaded:.1f}x | goal <= 2x |")  # fmt: skip
    s, c = uniform
    lines.append(f"| uniform 32 tokens, all waiting: tokens/s | {s.tokens_per_s:.0f} | {c.tokens_per_s:.0f} | "
                 f"{c.tokens_per_s / s.tokens_per_s:.2f}x |")  # fmt: skip
    if adapters:
        one_grouped, one_peft = adapters[1][1], adapters[1][2]
        lines += [
            "",
            f"Adapters: {args.batch} rows x 32 tokens, row i on adapter i % n (LoRA rank {args.lora_rank}, GPT-2's "
            "attention and MLP layers).",
            "",
            "| rows on | continuous + grouped LoRA: tokens/s | vs 1 adapter | static + peft adapter_names: tokens/s "
            "| vs 1 adapter |",
            "|---|---|---|---|---|",
        ]
        for label, grouped, peft in adapters:
            lines.append(f"| {label} | {grouped:.0f} | {grouped / one_grouped:.2f}x | {peft:.0f} | "
                         f"{peft / one_peft:.2f}x |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
