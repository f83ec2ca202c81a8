"""A worker process's own Prometheus figures, served on its own port (`worker_metrics_port`; 0: not served).

Counters and histograms are named like vLLM's (`vllm:prompt_tokens_total`, `vllm:time_to_first_token_seconds`,
`vllm:time_per_output_token_seconds`) and TGI's (`tgi_batch_current_size`), with the `llmq_` prefix; the job
counters and queue waits the state machine keeps (shared/counters.py) are served here too. The adapter caches
and CUDA memory are read at scrape time. Called from few places: `serve` at worker start, `on_step` as a step
hook of the continuous batching loop, `jobs_decoded` before a write-back, `training_logged` from the Trainer
callback. (The static batching path counts tokens but not time to first token or per-step figures.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.counters import BATCH_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

log = logging.getLogger(__name__)

PROMPT_TOKENS = Counter("llmq_prompt_tokens", "Prompt tokens of generations decoded, by model.", ["model"])
GENERATION_TOKENS = Counter("llmq_generation_tokens", "Tokens generated, by model.", ["model"])
TIME_TO_FIRST_TOKEN = Histogram(
    "llmq_time_to_first_token_seconds",
    "Submission of a generation job to its first generated token, by model.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "llmq_time_per_output_token_seconds",
    "Decoding time per output token after the first (one decoding step of its batch).",
    buckets=TPOT_BUCKETS,
)
BATCH_SIZE = Histogram("llmq_batch_size", "Rows decoded together per decoding batch.", buckets=BATCH_BUCKETS)
TRAIN_TOKENS = Counter("llmq_train_tokens", "Response tokens trained on (all fine-tunes of this worker).")
TRAIN_STEPS = Counter("llmq_train_steps", "Optimizer steps taken (all fine-tunes of this worker).")


# Job id -> when its first token was decoded (epoch seconds), from the step hook until its outcome is written.
_first_tokens: dict[str, float] = {}


def on_step(report: Any) -> None:
    """A step hook of the continuous loop (worker/scheduler.py StepReport): the rows decoded together, the
    step's time (each row's time per output token), and the first-token time of the jobs that joined."""
    if report.rows:
        BATCH_SIZE.observe(report.rows)
        TIME_PER_OUTPUT_TOKEN.observe(report.seconds)
    if report.joined:
        now = time.time()
        for job_id in report.joined:
            _first_tokens.setdefault(job_id, now)


def jobs_decoded(pairs: Sequence[tuple[Any, Any]]) -> None:
    """Generation jobs about to be written back (claim, (result, error)): their tokens and time to first token."""
    for claim, (result, _error) in pairs:
        first_token = _first_tokens.pop(claim.job_id, None)
        if result is None:
            continue
        model = claim.job.model
        PROMPT_TOKENS.labels(model).inc(result.usage.prompt_tokens)
        GENERATION_TOKENS.labels(model).inc(result.usage.completion_tokens)
        if first_token is not None:
            TIME_TO_FIRST_TOKEN.labels(model).observe(max(first_token - epoch_seconds(claim.job.created_at), 0.0))


def training_logged(steps: int, tokens: int) -> None:
    """Optimizer steps and trained tokens since the last call of this fine-tune."""
    if steps > 0:
        TRAIN_STEPS.inc(steps)
    if tokens > 0:
        TRAIN_TOKENS.inc(tokens)


def epoch_seconds(moment: datetime) -> float:
    """A database datetime (naive means UTC) as seconds since the epoch."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


class ScrapeTimeCollector(Collector):
    """Adapter cache figures of this process's generate models and CUDA memory, read at each scrape."""

    def __init__(self, adapter_stats: Callable[[], Sequence[tuple[str, int]]] | None) -> None:
        self.adapter_stats = adapter_stats

    def collect(self) -> Iterable[Metric]:
        if self.adapter_stats is not None:
            stats = dict(self.adapter_stats())
            hits = CounterMetricFamily("llmq_adapter_cache_hits", "Adapter disk cache hits.")
            hits.add_metric([], stats.get("hits", 0))
            misses = CounterMetricFamily("llmq_adapter_cache_misses", "Adapter disk cache misses (fetched).")
            misses.add_metric([], stats.get("misses", 0))
            evictions = CounterMetricFamily("llmq_adapter_cache_evictions", "Adapters evicted from the disk cache.")
            evictions.add_metric([], stats.get("evicted", 0))
            loads = CounterMetricFamily("llmq_adapter_loads", "Adapters loaded onto the base model.")
            loads.add_metric([], stats.get("loads", 0))
            unloads = CounterMetricFamily("llmq_adapter_unloads", "Adapters unloaded from the base model (LRU).")
            unloads.add_metric([], stats.get("unloads", 0))
            yield from (hits, misses, evictions, loads, unloads)
        yield from _cuda_memory()


def _cuda_memory() -> Iterable[Metric]:
    import torch

    if not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily("llmq_cuda_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"])
    reserved = GaugeMetricFamily("llmq_cuda_memory_reserved_bytes", "CUDA memory reserved by torch.", labels=["device"])
    peak = GaugeMetricFamily("llmq_cuda_memory_peak_bytes", "Peak CUDA memory held by tensors.", labels=["device"])
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
        reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        peak.add_metric([str(index)], torch.cuda.max_memory_allocated(index))
    yield from (allocated, reserved, peak)


def serve(port: int, host: str, adapter_stats: Callable[[], Sequence[tuple[str, int]]] | None) -> None:
    """Serves this process's figures on host:port (0: not served); a busy port is logged, not fatal."""
    if not port:
        return
    REGISTRY.register(ScrapeTimeCollector(adapter_stats))
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("worker metrics: cannot listen on %s:%d (%s); not served", host, port, exc)
        return
    log.info("worker metrics on http://%s:%d/metrics", host, port)
