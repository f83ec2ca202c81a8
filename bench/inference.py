"""Generation throughput and latency: naive baseline, in-process ceiling and the running system, side by side.

    python bench/inference.py [--quick] [--quantization nf4|int8|bf16|fp32] [--py-spy DIR]

All runs use the full-size GPT-2 architecture with random weights (worker.model_factory.build_full_size_gpt2,
cached under --cache-dir), greedy decoding, 32 new tokens, Alpaca prompts of about 40 tokens.

(a) naive: one prompt at a time through transformers' model.generate, model loaded once, in this process.
    A subset of the prompts (--naive-prompts): it runs at tens of tokens/s; the ratios compare tokens/s.
(b) ceiling: the same prompts in batches of 32 through worker.generation.generate, same loaded model.
    Also with one LoRA adapter and with 4 adapters mixed in every batch (peft adapter_names).
(c) system: gateway + Redis + one generate worker (Celery, a real process) + Postgres; --clients concurrent
    clients each submit one-prompt jobs and wait with ?wait= until done, --jobs jobs in all.
(d) the same system with one LoRA adapter, then 4 adapters mixed (client k uses adapter k % 4).
(e) plumbing at low load: one client, 1-token jobs one after another; end-to-end minus model time.

Latency: for (a) and (b) one generate call (a batch's prompts all finish with it); for (c) and (d) POST start
to the client seeing the terminal job. tokens/s counts the completion tokens actually produced.

Needs Postgres (LLMQ_TEST_DATABASE_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test; a fresh
database is created and dropped) and Redis (LLMQ_BENCH_REDIS_URL, default redis://127.0.0.1:6379/12, flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from measure import (  # bench/measure.py
    cpu_times,
    loadavg,
    log,
    machine_busy_seconds,
    ms,
    pct,
    start_py_spy,
    stop_py_spy,
)
from measure import machine as machine_cpu
from systems import System, fresh_database, postgres_backends, start_system  # bench/systems.py

from shared.prompts import alpaca_prompt  # the repo root is on sys.path once bench/systems.py is imported
from shared.statuses import TERMINAL

REDIS = os.environ.get("LLMQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
BATCH_LINE = re.compile(r"batch of (\d+) jobs, (\d+) prompts in ([\d.]+) s")  # worker.serving's INFO line
RECEIVED_LINE = re.compile(r"Task llmq\.generate\[[^\]]+\] received")  # Celery's INFO line, one per message


# ---------------------------------------------------------------------------------------------- results


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each named group of processes; missing ones count 0."""
    return {name: sum(cpu_times(group).values()) for name, group in pids.items()}


class Meter:
    """Over a run: the load average, our processes' CPU seconds, and the CPU share everybody else took.

    others = (machine busy time - our processes' CPU time) / (wall time x cores): how much of the machine
    other processes took while we measured. Well above a few percent, the figures are not comparable.
    """

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self._pids = pids
        self.cpu: dict[str, float] = {}
        self.others = math.nan
        self.load = (math.nan, math.nan)

    def __enter__(self) -> Meter:
        self._groups = self._pids()
        self._load0 = loadavg()
        self._ours0 = cpu_seconds(self._groups)
        self._busy0 = machine_busy_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        busy = machine_busy_seconds() - self._busy0
        groups = {k: sorted(set(v) | set(self._groups.get(k, []))) for k, v in self._pids().items()}
        ours1 = cpu_seconds(groups)  # a process born during the run counts from 0
        self.cpu = {k: ours1[k] - self._ours0.get(k, 0.0) for k in ours1}
        cores = len(os.sched_getaffinity(0))
        self.others = max(0.0, busy - sum(self.cpu.values())) / (wall * cores)
        self.load = (self._load0, loadavg())


def this_process() -> dict[str, list[int]]:
    return {"bench process": [os.getpid()]}


@dataclass
class Row:
    """One measured run."""

    name: str
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]
    meter: Meter
    notes: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


@dataclass
class JobSample:
    latency: float
    queue_seconds: float
    run_seconds: float
    tokens: int
    submitted: float  # epoch seconds: the client starts its POST
    created: float  # the job row's created_at
    started: float  # started_at: the claim (one value for every job of a batch)
    finished: float  # finished_at: this job's write-back
    seen: float  # the client has the terminal job


@dataclass
class SystemPhase:
    """A system run: the row plus where its time went."""

    row: Row
    samples: list[JobSample]
    batches: list[tuple[int, float]]  # (jobs, seconds) per worker batch, from the worker's log
    messages: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds during the run


# ---------------------------------------------------------------------------------------------- inputs


def make_prompts(tokenizer: Any, count: int, low: int = 36, high: int = 44) -> list[str]:
    """count distinct Alpaca prompts of low..high tokens, instructions cut from the shipped corpus."""
    from worker.model_factory import corpus_paths

    text = " ".join(p.read_text(encoding="utf-8") for p in corpus_paths())
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if 20 < len(s.strip()) < 300]
    prompts: list[str] = []
    seen: set[str] = set()
    for sentence in sentences:
        if "{" in sentence or "#" in sentence:
            continue
        words = sentence.split()
        # Longest prefix of the sentence whose prompt fits; then accept it if it is long enough.
        for end in range(len(words), 2, -1):
            prompt = alpaca_prompt(" ".join(words[:end]))
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n <= high:
                if n >= low and prompt not in seen:
                    seen.add(prompt)
                    prompts.append(prompt)
                break
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"only {len(prompts)} prompts of {low}-{high} tokens in the corpus")


def make_adapters(model_dir: Path, out_root: Path, count: int, rank: int) -> list[Path]:
    """count random LoRA adapters (the fine-tune defaults: rank, alpha 2r, GPT-2's Conv1D layers), cached."""
    folders = [out_root / f"bench{i}" for i in range(count)]
    if all((f / "adapter_model.safetensors").is_file() for f in folders):
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.fine_tuning import DEFAULT_TARGET_MODULES

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGET_MODULES), fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    out_root.mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(folders):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=out_root))
        peft_model.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    return folders


# ---------------------------------------------------------------------------------------------- in-process


@dataclass
class InProcess:
    naive: Row
    ceiling: Row
    ceiling_one_adapter: Row
    ceiling_mixed: Row
    one_token_model: list[float]  # seconds of a 1-token generate, batch 1
    one_token_meter: Meter


def load_adapters(loaded: Any, folders: Sequence[Path]) -> list[str]:
    """Loads these adapter folders onto the model with peft, as worker.adapters does; their names."""
    from peft import PeftModel

    names = [f"bench{i}" for i in range(len(folders))]
    for name, folder in zip(names, folders, strict=True):
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(folder), adapter_name=name, is_trainable=False)
    loaded.model.eval()
    return names


def run_in_process(
    model_dir: Path, quantization: str, prompts: list[str], adapters: list[Path], args: argparse.Namespace
) -> InProcess:
    import torch

    from worker.generation import Request, SamplingParams, generate
    from worker.model_loading import load_base_model

    loaded = load_base_model(str(model_dir), "main", quantization, "cpu")  # type: ignore[arg-type]
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    greedy = SamplingParams(max_new_tokens=args.max_tokens, temperature=0)

    def naive_one(prompt: str) -> tuple[int, float]:
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(
                **enc, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos
            )
        return int(out.shape[1] - enc["input_ids"].shape[1]), time.perf_counter() - started

    def batched(name: str, subset: list[str], adapter_of: Callable[[int], str | None], notes: str) -> Row:
        generate(loaded, [Request(p, greedy, adapter_of(i)) for i, p in enumerate(subset[: args.batch])])  # warm
        tokens, latencies = 0, []
        started = time.perf_counter()
        with Meter(this_process) as meter:
            for start in range(0, len(subset), args.batch):
                chunk = subset[start : start + args.batch]
                t0 = time.perf_counter()
                gens = generate(loaded, [Request(p, greedy, adapter_of(start + i)) for i, p in enumerate(chunk)])
                latencies.append(time.perf_counter() - t0)
                tokens += sum(g.completion_tokens for g in gens)
        seconds = time.perf_counter() - started
        log(f"{name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s, others {meter.others:.0%}")
        return Row(name, len(subset), tokens, seconds, latencies, meter, notes)

    log(f"in-process: naive, {args.naive_prompts} prompts one at a time")
    naive_one(prompts[0])  # warm: the first 4-bit forward repacks weights
    tokens, latencies = 0, []
    started = time.perf_counter()
    with Meter(this_process) as meter:
        for prompt in prompts[: args.naive_prompts]:
            n, seconds = naive_one(prompt)
            tokens += n
            latencies.append(seconds)
    naive = Row(
        "(a) naive: model.generate, 1 prompt at a time",
        args.naive_prompts,
        tokens,
        time.perf_counter() - started,
        latencies,
        meter,
        f"subset of {args.naive_prompts} prompts",
    )
    log(f"naive: {naive.tokens_per_s:.0f} tokens/s, others {meter.others:.0%}")

    one_token = SamplingParams(max_new_tokens=1, temperature=0)
    generate(loaded, [Request(prompts[0], one_token)])
    one_token_model = []
    with Meter(this_process) as one_token_meter:
        for prompt in prompts[: args.plumbing_jobs]:
            t0 = time.perf_counter()
            generate(loaded, [Request(prompt, one_token)])
            one_token_model.append(time.perf_counter() - t0)

    subset = prompts[: args.ceiling_prompts]
    ceiling = batched(f"(b) ceiling: generate(), batches of {args.batch}", subset, lambda i: None, "")

    order = load_adapters(loaded, adapters)
    first = order[0]
    subset = prompts[: args.adapter_ceiling_prompts]
    one = batched("(b1) ceiling, 1 LoRA adapter", subset, lambda i: first, "1 adapter loaded")
    mixed = batched(
        f"(b4) ceiling, {len(order)} adapters mixed", subset, lambda i: order[i % len(order)], "every batch mixed"
    )
    return InProcess(naive, ceiling, one, mixed, one_token_model, one_token_meter)


# ---------------------------------------------------------------------------------------------- system


def system_pids(system: System) -> dict[str, list[int]]:
    """Our processes of a system run, by role (the clients run in this process)."""
    return {
        "worker": [system.pid("worker-generate")],
        "gateway": [system.pid("gateway")],
        "clients (bench process)": [os.getpid()],
        "postgres backends": postgres_backends(system.db_url),
    }


async def run_clients(
    base_url: str, jobs: int, clients: int, models: list[str | None], prompts: list[str], max_tokens: int
) -> tuple[list[JobSample], float]:
    """Each client submits a job, waits for it, repeats; until jobs in all. (samples, wall seconds)."""
    counter = itertools.count()
    samples: list[JobSample] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:

        async def client(k: int) -> None:
            model = models[k % len(models)]
            while (i := next(counter)) < jobs:
                body: dict[str, Any] = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
                if model is not None:
                    body["model"] = model
                submitted, started = time.time(), time.perf_counter()
                response = await http.post("/v1/generations", json=body)
                response.raise_for_status()
                job = response.json()
                while job["status"] not in TERMINAL:
                    job = (await http.get(f"/v1/generations/{job['id']}", params={"wait": 60})).json()
                latency, seen = time.perf_counter() - started, time.time()
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
                tokens = sum(o["completion_tokens"] for o in job["outputs"])
                created, claimed, finished = (
                    datetime.fromisoformat(job[k]).timestamp() for k in ("created_at", "started_at", "finished_at")
                )
                sample = JobSample(
                    latency,
                    job["queue_seconds"],
                    job["run_seconds"],
                    tokens,
                    submitted,
                    created,
                    claimed,
                    finished,
                    seen,
                )
                samples.append(sample)

        started = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return samples, time.perf_counter() - started


def read_batches(path: Path, offset: int) -> tuple[list[tuple[int, float]], int]:
    """(jobs, seconds) of every batch the worker logged after offset, and the messages it received."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        text = f.read()
    batches = [(int(m[1]), float(m[3])) for m in BATCH_LINE.finditer(text)]
    return batches, len(RECEIVED_LINE.findall(text))


def system_phase(
    system: System,
    name: str,
    jobs: int,
    clients: int,
    models: list[str | None],
    prompts: list[str],
    args: argparse.Namespace,
    notes: str,
) -> SystemPhase:
    # Warm: one round of full batches, so that adapter loads and first-forward costs are not measured.
    asyncio.run(run_clients(system.base_url, 2 * args.batch, 2 * args.batch, models, prompts, args.max_tokens))
    time.sleep(0.5)
    worker_log = system.log_dir / "worker-generate.log"
    offset = worker_log.stat().st_size
    spy = py_spy_recordings(args.py_spy, name, system_pids(system)) if args.py_spy else []
    log(f"{name}: {jobs} jobs from {clients} clients")
    with Meter(lambda: system_pids(system)) as meter:
        samples, wall = asyncio.run(run_clients(system.base_url, jobs, clients, models, prompts, args.max_tokens))
    stop_py_spy(spy)
    time.sleep(0.2)  # the worker logs a batch just after publishing its results
    batches, messages = read_batches(worker_log, offset)
    tokens = sum(s.tokens for s in samples)
    row = Row(name, jobs, tokens, wall, [s.latency for s in samples], meter, notes)
    log(f"{name}: {tokens / wall:.0f} tokens/s, p50 {pct(row.latencies, 50) * 1000:.0f} ms, others {meter.others:.0%}")
    return SystemPhase(row, samples, batches, messages, meter.cpu)


@dataclass
class Plumbing:
    total: list[float]  # end-to-end seconds of each 1-token job
    run: list[float]  # its run_seconds (claim -> finish)
    queue: list[float]  # its queue_seconds (created -> claimed)
    meter: Meter


def plumbing_phase(system: System, prompts: list[str], jobs: int) -> Plumbing:
    """End-to-end, run and queue seconds of 1-token jobs sent one after another by one client."""
    total: list[float] = []
    run: list[float] = []
    queue: list[float] = []
    with httpx.Client(base_url=system.base_url, timeout=60) as http, Meter(lambda: system_pids(system)) as meter:
        for i in range(jobs + 5):
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": 1, "temperature": 0}
            started = time.perf_counter()
            job = http.post("/v1/generations", json=body).json()
            while job["status"] not in TERMINAL:
                job = http.get(f"/v1/generations/{job['id']}", params={"wait": 30}).json()
            elapsed = time.perf_counter() - started
            assert job["status"] == "succeeded", job
            if i >= 5:  # the first few warm the connections
                total.append(elapsed)
                run.append(job["run_seconds"])
                queue.append(job["queue_seconds"])
    return Plumbing(total, run, queue, meter)


def py_spy_recordings(out_dir: Path, phase: str, pids: dict[str, list[int]]) -> list[subprocess.Popen[bytes]]:
    """py-spy raw stacks of worker and gateway during a phase, into out_dir/<phase>-<who>.txt."""
    slug = re.sub(r"[^a-z0-9]+", "-", phase.lower()).strip("-")
    return [start_py_spy(pids[who][0], out_dir / f"{slug}-{who}.txt", rate=100) for who in ("worker", "gateway")]


def register_adapters(db_url: str, base_model: str, data: Path, folders: list[Path]) -> list[str]:
    """Copies the adapters into the artifact store and registers each as a fine-tuned model; their ids.

    A fine-tuned model row needs its fine-tune's job row: a train job is created through the state machine
    and, this being a bench, marked succeeded directly.
    """
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from shared import artifacts, job_states
    from shared.artifacts import ADAPTER_SEAL, ArtifactStore
    from shared.db import make_engine
    from shared.fine_tuning import Hyperparameters
    from shared.job_data import FineTuneParams
    from shared.models import FineTunedModel, Job, utcnow
    from shared.settings import Settings

    engine = make_engine(db_url)
    store = ArtifactStore.from_settings(Settings(data_dir=data))
    ids = []
    with Session(engine) as session:
        for i, folder in enumerate(folders):
            relative = artifacts.adapter_key(f"bench{i}", 1)
            files = store.put_sealed(folder, relative, ADAPTER_SEAL, {"bench": True})
            hyperparameters = Hyperparameters().resolved().model_dump()
            params = FineTuneParams(metadata={"bench": "true"}, hyperparameters=hyperparameters)
            job = job_states.create_job(
                session, kind="train", model=base_model, base_model=base_model, params=params, max_attempts=1
            )
            session.flush()
            now = utcnow()
            session.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(status="succeeded", attempt=1, started_at=now, finished_at=now, updated_at=now)
            )
            model_id = f"ft:gpt2:bench{i}:{job.id}"
            session.add(
                FineTunedModel(
                    id=model_id,
                    job_id=job.id,
                    base_model=base_model,
                    path=relative,
                    manifest={"bench": True, "files": files},
                )
            )
            ids.append(model_id)
        session.commit()
    engine.dispose()
    return ids


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    """The machine (measure.machine) with torch's threads and the model stack's versions."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    return (
        f"{machine_cpu()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


def table_row(row: Row) -> str:
    return (
        f"| {row.name} | {row.requests} | {row.tokens} | {row.seconds:.1f} | {row.tokens_per_s:.0f} | "
        f"{row.requests_per_s:.2f} | {ms(pct(row.latencies, 50))} | {ms(pct(row.latencies, 99))} | "
        f"{row.meter.load[0]:.1f} -> {row.meter.load[1]:.1f} | {row.meter.others:.0%} | {row.notes} |"
    )


def report(
    args: argparse.Namespace,
    inproc: InProcess,
    phases: dict[str, SystemPhase],
    plumbing: Plumbing,
    started_load: float,
) -> str:
    lines = [
        "",
        f"command: `{' '.join(['python', 'bench/inference.py', *sys.argv[1:]])}`",
        f"machine: {machine()}",
        f"model: full-size GPT-2 (124M, random weights), {args.quantization}, greedy, {args.max_tokens} new tokens, "
        f"prompts 36-44 tokens; load average (1 min) at start {started_load:.2f}",
        "",
        "| run | requests | new tokens | wall s | tokens/s | requests/s | p50 ms | p99 ms | load avg | others' CPU "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [inproc.naive, inproc.ceiling, inproc.ceiling_one_adapter, inproc.ceiling_mixed]
    rows += [p.row for p in phases.values()]
    lines += [table_row(r) for r in rows]

    base, one, mixed = phases["base"].row, phases["one"].row, phases["mixed"].row
    ratios = [
        ("system / naive (tokens/s)", base.tokens_per_s / inproc.naive.tokens_per_s, ">= 5"),
        ("system / ceiling (tokens/s)", base.tokens_per_s / inproc.ceiling.tokens_per_s, ">= 0.8"),
        ("4 adapters mixed / 1 adapter, system", mixed.tokens_per_s / one.tokens_per_s, ">= 0.8"),
        (
            "4 adapters mixed / 1 adapter, in-process",
            inproc.ceiling_mixed.tokens_per_s / inproc.ceiling_one_adapter.tokens_per_s,
            "",
        ),
        ("1 adapter system / 1 adapter ceiling", one.tokens_per_s / inproc.ceiling_one_adapter.tokens_per_s, ""),
        ("4 mixed system / 4 mixed ceiling", mixed.tokens_per_s / inproc.ceiling_mixed.tokens_per_s, ""),
    ]
    lines += [
        "",
        "others' CPU: the share of the machine that processes other than this bench's took during the run "
        "(machine busy time minus ours); above a few percent the run was disturbed and is not comparable.",
        "",
        "| ratio | measured | goal |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value:.2f} | {goal} |" for name, value, goal in ratios]

    total, run, queue = plumbing.total, plumbing.run, plumbing.queue
    model = inproc.one_token_model
    model_p50 = pct(model, 50)
    over_model = [t - model_p50 for t in total]
    outside_worker = [t - r for t, r in zip(total, run, strict=True)]
    inside_worker = [r - model_p50 for r in run]
    lines += [
        "",
        f"plumbing: {len(total)} sequential 1-token jobs, one client (goal: p50 end-to-end minus model <= 20 ms); "
        f"others' CPU {plumbing.meter.others:.0%} during the jobs, {inproc.one_token_meter.others:.0%} during the "
        "in-process model timing",
        "",
        "| quantity | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| end-to-end (POST start -> terminal GET) | {ms(pct(total, 50))} | {ms(pct(total, 99))} |",
        f"| model: 1-token generate in-process, batch 1 | {ms(model_p50)} | {ms(pct(model, 99))} |",
        f"| **plumbing = end-to-end - model p50** | **{ms(pct(over_model, 50))}** | {ms(pct(over_model, 99))} |",
        f"| worker run_seconds (claim -> finish) | {ms(pct(run, 50))} | {ms(pct(run, 99))} |",
        f"| in worker, beyond the model (run_seconds - model p50) | {ms(pct(inside_worker, 50))} | "
        f"{ms(pct(inside_worker, 99))} |",
        f"| queue_seconds (row created -> claimed) | {ms(pct(queue, 50))} | {ms(pct(queue, 99))} |",
        f"| outside the worker (end-to-end - run_seconds) | {ms(pct(outside_worker, 50))} | "
        f"{ms(pct(outside_worker, 99))} |",
    ]

    lines += [
        "",
        "where the system's time went: batches (from the worker's log; busy = sum of batch times / wall; "
        "x in-process = mean batch time / the matching ceiling's; write-back = first to last finished_at of a "
        "batch, its jobs grouped by started_at) and CPU seconds during the run; the batch columns come from "
        "static batching's per-batch log lines (LLMQ_BATCHING=static): continuous batching, the default, has "
        "no batches to count and leaves them at 0",
        "",
        "| run | batches | jobs/batch mean (min-max) | worker busy | batch s mean (x in-process) | "
        "write-back ms/batch | messages | CPU s: " + ", ".join(next(iter(phases.values())).cpu) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ceilings = {"base": inproc.ceiling, "one": inproc.ceiling_one_adapter, "mixed": inproc.ceiling_mixed}
    breakdown = []
    for key, phase in phases.items():
        sizes = [b[0] for b in phase.batches] or [0]
        busy = sum(b[1] for b in phase.batches) / phase.row.seconds
        batch_s = statistics.mean([b[1] for b in phase.batches]) if phase.batches else math.nan
        slowdown = batch_s / statistics.mean(ceilings[key].latencies)
        by_batch: dict[float, list[JobSample]] = {}
        for sample in phase.samples:
            by_batch.setdefault(sample.started, []).append(sample)
        last = {started: max(x.finished for x in group) for started, group in by_batch.items()}
        write_back = statistics.mean(last[k] - min(x.finished for x in g) for k, g in by_batch.items())
        cpu = ", ".join(f"{v:.1f}" for v in phase.cpu.values())
        lines.append(
            f"| {phase.row.name} | {len(phase.batches)} | {statistics.mean(sizes):.1f} ({min(sizes)}-{max(sizes)}) | "
            f"{busy:.0%} | {batch_s:.2f} ({slowdown:.2f}x) | {ms(write_back)} | {phase.messages} | {cpu} |"
        )
        parts = [
            [s.created - s.submitted for s in phase.samples],
            [s.queue_seconds for s in phase.samples],
            [s.run_seconds for s in phase.samples],
            [last[s.started] - s.finished for s in phase.samples],
            [s.seen - last[s.started] for s in phase.samples],
        ]
        breakdown.append(f"| {phase.row.name} | " + " | ".join(ms(pct(values, 50)) for values in parts) + " |")
    lines += [
        "",
        "latency of a system job, p50 of each part (ms): submit = POST start to the row's created_at; queue = "
        "created_at to the claim; run = claim to its own finished_at; write-back wait = its finished_at to its "
        "batch's last; notify = the batch's last finished_at to the client holding the result",
        "",
        "| run | submit | queue | run | write-back wait | notify |",
        "|---|---|---|---|---|---|",
        *breakdown,
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and jobs (about 3 minutes)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmq-bench-cache")
    parser.add_argument("--jobs", type=int, help="jobs per system run (default 256, quick 128)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--naive-prompts", type=int, help="prompts for the naive baseline (default 32, quick 8)")
    parser.add_argument("--ceiling-prompts", type=int, help="prompts for the ceiling (default 256, quick 64)")
    parser.add_argument("--adapter-ceiling-prompts", type=int, help="prompts per adapter ceiling (128, quick 64)")
    parser.add_argument("--plumbing-jobs", type=int, help="1-token jobs for the plumbing run (50, quick 20)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the ceiling and the worker's max")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--py-spy", type=Path, help="record py-spy raw stacks of worker and gateway per system run")
    args = parser.parse_args()
    quick = args.quick
    args.jobs = args.jobs or (128 if quick else 256)
    args.naive_prompts = args.naive_prompts or (8 if quick else 32)
    args.ceiling_prompts = args.ceiling_prompts or (64 if quick else 256)
    args.adapter_ceiling_prompts = args.adapter_ceiling_prompts or (64 if quick else 128)
    args.plumbing_jobs = args.plumbing_jobs or (20 if quick else 50)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # A plain kill must still stop the children and drop the database (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_load = loadavg()

    from transformers import AutoTokenizer

    from worker.model_factory import build_full_size_gpt2

    log("building / reusing the full-size GPT-2 and the adapters")
    model_dir = build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    adapters = make_adapters(model_dir, args.cache_dir / f"adapters-r{args.lora_rank}", 4, args.lora_rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = max(args.jobs, args.ceiling_prompts, args.naive_prompts, args.adapter_ceiling_prompts)
    prompts = make_prompts(tokenizer, count)

    inproc = run_in_process(model_dir, args.quantization, prompts, adapters, args)
    gc.collect()  # the in-process model is gone before the system starts

    data = Path(tempfile.mkdtemp(prefix="llmq-bench-inference-"))
    redis.Redis.from_url(REDIS).flushdb()
    phases: dict[str, SystemPhase] = {}
    try:
        with fresh_database("llmq_bench") as db_url:
            log(f"database {db_url.rpartition('/')[2]}, data and logs in {data}")
            model_ids = register_adapters(db_url, str(model_dir), data, adapters)
            env = {
                "LLMQ_DATABASE_URL": db_url,
                "LLMQ_BROKER_URL": REDIS,
                "LLMQ_DATA_DIR": str(data),
                "LLMQ_BASE_MODEL": str(model_dir),
                "LLMQ_QUANTIZATION": args.quantization,
                "LLMQ_DEVICE": "cpu",
                "LLMQ_MAX_BATCH_SIZE": str(args.batch),
                "HF_HUB_OFFLINE": "1",
            }
            system = start_system(env, data / "logs")
            try:
                log("system up; waiting for the worker's model")
                with httpx.Client(base_url=system.base_url, timeout=300) as http:
                    job = http.post("/v1/generations", json={"prompt": prompts[0], "max_tokens": 1}).json()
                    http.get(f"/v1/generations/{job['id']}", params={"wait": 120}).raise_for_status()
                clients, jobs = args.clients, args.jobs
                phases["base"] = system_phase(
                    system, f"(c) system, {clients} clients", jobs, clients, [None], prompts, args, "base model"
                )
                log("plumbing: sequential 1-token jobs")
                plumbing = plumbing_phase(system, prompts, args.plumbing_jobs)
                one_adapter = [model_ids[0]]
                phases["one"] = system_phase(
                    system, "(d1) system, 1 LoRA adapter", jobs, clients, one_adapter, prompts, args, "1 adapter loaded"
                )
                mixed = f"(d4) system, {len(model_ids)} adapters mixed"
                phases["mixed"] = system_phase(
                    system, mixed, jobs, clients, list(model_ids), prompts, args, "client k uses adapter k % 4"
                )
            finally:
                system.children.stop_all()
    finally:
        redis.Redis.from_url(REDIS).flushdb()
        print(f"system logs: {data / 'logs'}", file=sys.stderr)

    print(report(args, inproc, phases, plumbing, started_load))


if __name__ == "__main__":
    main()
