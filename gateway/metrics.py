"""Prometheus metrics of the whole service: the gateway's counters (shared/counters.py) and figures read from
the database (and the broker) at scrape time.

Workers may run on other machines, so nothing here counts in process memory: every scrape runs a few cheap
queries and reports what the rows say. Any gateway gives the same job figures; scrape one of them (or take
max() across them).

- Current state, over all jobs: jobs per kind and status, queued jobs and the oldest one's age per queue
  (one GROUP BY that the claim index `ix_jobs_claim (kind, status, ...)` serves), messages waiting in the
  broker per queue, and the progress of every running fine-tune.
- Recent work: the histograms, token count and per-model figures cover the jobs that finished in the last
  `metrics_window_seconds` (at most the `metrics_window_jobs` newest of them). They are gauge histograms:
  read them as they stand, `histogram_quantile(0.95, llmq_job_run_seconds_bucket)`, not through rate();
  `llmq_metrics_window_seconds` is the span they cover, so `llmq_generated_tokens / llmq_metrics_window_seconds`
  is tokens per second.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared import workers
from shared.celery_app import QUEUES, waiting_messages
from shared.counters import GATEWAY_COUNTERS, multiprocess_dir
from shared.db import get_sessionmaker
from shared.job_data import FineTuneResult
from shared.models import Job, JobEvent, utcnow
from shared.settings import Settings, get_settings
from shared.statuses import JobStatus

log = logging.getLogger(__name__)

KINDS = ("generate", "train", "export")

# Bucket bounds (upper, inclusive). Queue waits are milliseconds when idle and minutes under load; runs are
# a fraction of a second for a small generation and hours for a fine-tune.
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class FinishedJob:
    """What the metrics need of one recently finished job (never its prompts or outputs)."""

    kind: str
    model: str
    status: str
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    completion_tokens: int | None
    batch_size: int | None

    @property
    def wait_seconds(self) -> float | None:
        """Submission to the start of the last attempt (None for a job cancelled before it started)."""
        return (self.started_at - self.created_at).total_seconds() if self.started_at else None

    @property
    def run_seconds(self) -> float | None:
        """Start of the last attempt to the end."""
        return (self.finished_at - self.started_at).total_seconds() if self.started_at else None


@dataclass(frozen=True)
class Training:
    """Progress of one running fine-tune, as its worker last recorded it."""

    job_id: str
    model: str
    progress: FineTuneResult
    val_loss: float | None


@dataclass
class Snapshot:
    """Everything one scrape reads from the database."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, status) -> jobs
    oldest_queued: dict[str, datetime] = field(default_factory=dict)  # kind -> created_at
    finished: list[FinishedJob] = field(default_factory=list)  # newest first
    window_seconds: float = 0.0
    training: list[Training] = field(default_factory=list)


def read_snapshot(session: Session, settings: Settings, now: datetime) -> Snapshot:
    """The figures of one scrape: three aggregate reads, bounded by the window where they could grow."""
    snapshot = Snapshot()
    rows = session.execute(
        select(Job.kind, Job.status, func.count(), func.min(Job.created_at)).group_by(Job.kind, Job.status)
    ).all()
    for kind, status, count, oldest in rows:
        snapshot.counts[(kind, status)] = count
        if status == JobStatus.QUEUED:
            snapshot.oldest_queued[kind] = oldest

    window = timedelta(seconds=settings.metrics_window_seconds)
    # The two figures come back as JSON values and are checked here, row by row: a cast in SQL would fail the
    # whole read (every tenant's metrics) on one row holding something else.
    finished = session.execute(
        select(
            Job.id,
            Job.kind,
            Job.model,
            Job.status,
            Job.worker,
            Job.created_at,
            Job.started_at,
            Job.finished_at,
            Job.result[("usage", "completion_tokens")].label("completion_tokens"),
            Job.result["batch_size"].label("batch_size"),
        )
        .where(Job.finished_at >= now - window)
        .order_by(Job.finished_at.desc())
        .limit(settings.metrics_window_jobs)
    ).all()
    snapshot.finished = [
        FinishedJob(
            kind=row.kind,
            model=row.model,
            status=row.status,
            worker=row.worker,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            completion_tokens=_count(row.id, "completion_tokens", row.completion_tokens),
            batch_size=_count(row.id, "batch_size", row.batch_size),
        )
        for row in finished
    ]
    full = len(finished) == settings.metrics_window_jobs
    # When the job limit cut the window short, the figures cover only the span back to the oldest job read.
    oldest = snapshot.finished[-1].finished_at if full else now - window
    snapshot.window_seconds = max((now - oldest).total_seconds(), 0.0)

    running = session.execute(
        select(Job.id, Job.model, Job.result).where(Job.kind == "train", Job.status == JobStatus.RUNNING)
    ).all()
    val_losses = _latest_val_losses(session, [row.id for row in running])
    snapshot.training = [
        Training(row.id, row.model, progress=_progress(row.id, row.result), val_loss=val_losses.get(row.id))
        for row in running
    ]
    return snapshot


def _progress(job_id: str, result: object) -> FineTuneResult:
    """A running fine-tune's progress figures; none (logged) when its row holds something else."""
    try:
        return FineTuneResult.model_validate(result) if result is not None else FineTuneResult()
    except ValidationError:
        log.warning("metrics: job %s has a result that is not a fine-tune's progress; left out", job_id)
        return FineTuneResult()


def _count(job_id: str, name: str, value: object) -> int | None:
    """A job's recorded count, or None (logged) when the row holds something else there."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    log.warning("metrics: job %s has %s %r, not a count; left out", job_id, name, value)
    return None


def _latest_val_losses(session: Session, job_ids: Sequence[str]) -> dict[str, float]:
    """The newest validation loss event of each of these (running) fine-tunes."""
    if not job_ids:
        return {}
    has_val_loss = (
        JobEvent.job_id.in_(job_ids),
        JobEvent.type == "metrics",
        JobEvent.data["val_loss"].as_string().is_not(None),  # as text: a cast would fail on a bad row
    )
    newest = select(func.max(JobEvent.id)).where(*has_val_loss).group_by(JobEvent.job_id)
    rows = session.execute(select(JobEvent.job_id, JobEvent.data).where(JobEvent.id.in_(newest))).all()
    losses = {}
    for job_id, data in rows:
        value = data.get("val_loss") if isinstance(data, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            losses[job_id] = float(value)
        else:
            log.warning("metrics: job %s has val_loss %r, not a number; left out", job_id, value)
    return losses


# --------------------------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------------------------


def broker_messages() -> dict[str, int]:
    """Messages waiting in the broker per queue, not yet handed to a worker (raises when it is unreachable)."""
    return {queue: waiting_messages(kind) for kind, queue in QUEUES.items() if kind == queue}  # one kind per queue


# --------------------------------------------------------------------------------------------------------
# Metric families
# --------------------------------------------------------------------------------------------------------


def _histogram(
    name: str, documentation: str, labels: Sequence[str], bounds: Sequence[float]
) -> tuple[GaugeHistogramMetricFamily, Callable[[Sequence[str], Sequence[float]], None]]:
    """A gauge histogram and a function that adds one label set's observations to it."""
    family = GaugeHistogramMetricFamily(name, documentation, labels=list(labels))

    def add(label_values: Sequence[str], values: Sequence[float]) -> None:
        buckets = [(_bound(b), sum(1 for v in values if v <= b)) for b in bounds]
        buckets.append(("+Inf", len(values)))
        family.add_metric(list(label_values), buckets=buckets, gsum_value=sum(values))

    return family, add


def _bound(value: float) -> str:
    return str(float(value))


def _job_families(snapshot: Snapshot, now: datetime) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "llmq_jobs", "Jobs per kind and status (all jobs in the database).", labels=["kind", "status"]
    )
    for kind in KINDS:
        for status in JobStatus:
            jobs.add_metric([kind, status.value], snapshot.counts.get((kind, status.value), 0))
    yield jobs

    depth = GaugeMetricFamily("llmq_queue_depth", "Queued jobs per queue (from the database).", labels=["queue"])
    oldest = GaugeMetricFamily(
        "llmq_queue_oldest_seconds", "Age of the oldest queued job per queue (0 when none waits).", labels=["queue"]
    )
    for queue in dict.fromkeys(QUEUES.values()):  # a queue serves one kind or more (train: fine-tunes and exports)
        kinds = [kind for kind in KINDS if QUEUES[kind] == queue]
        depth.add_metric([queue], sum(snapshot.counts.get((kind, JobStatus.QUEUED.value), 0) for kind in kinds))
        since = min((s for kind in kinds if (s := snapshot.oldest_queued.get(kind)) is not None), default=None)
        oldest.add_metric([queue], max((now - since).total_seconds(), 0.0) if since else 0.0)
    yield depth
    yield oldest


def _window_families(snapshot: Snapshot, settings: Settings) -> Iterator[Metric]:
    finished = snapshot.finished
    yield GaugeMetricFamily(
        "llmq_metrics_window_seconds",
        "Span the recent-work figures cover (metrics_window_seconds, or less when metrics_window_jobs cut it).",
        value=snapshot.window_seconds,
    )
    yield GaugeMetricFamily(
        "llmq_metrics_window_jobs", "Finished jobs the recent-work figures cover.", value=len(finished)
    )

    wait, add_wait = _histogram(
        "llmq_job_queue_wait_seconds", "Submission to start of recently finished jobs.", ["kind"], WAIT_BUCKETS
    )
    run, add_run = _histogram("llmq_job_run_seconds", "Start to end of recently finished jobs.", ["kind"], RUN_BUCKETS)
    for kind in KINDS:
        of_kind = [j for j in finished if j.kind == kind]
        add_wait([kind], [w for j in of_kind if (w := j.wait_seconds) is not None])
        add_run([kind], [r for j in of_kind if (r := j.run_seconds) is not None])
    yield wait
    yield run

    generated = [j for j in finished if j.kind == "generate"]
    # Jobs claimed together share their worker and start time: one batch, counted once.
    batches = {(j.worker, j.started_at): j.batch_size for j in generated if j.batch_size is not None}
    batch, add_batch = _histogram(
        "llmq_batch_size", "Outputs decoded together per generate batch, recent batches.", [], BATCH_BUCKETS
    )
    add_batch([], [size for size in batches.values() if size is not None])
    yield batch

    by_model: dict[str, list[FinishedJob]] = defaultdict(list)
    for job in generated:
        by_model[job.model].append(job)
    tokens = GaugeMetricFamily(
        "llmq_generated_tokens", "Completion tokens of recently finished generation jobs.", labels=["model"]
    )
    requests = GaugeMetricFamily(
        "llmq_model_requests", "Recently finished generation jobs per model and status.", labels=["model", "status"]
    )
    latency, add_latency = _histogram(
        "llmq_model_latency_seconds",
        "Submission to end of recently succeeded generation jobs, per model.",
        ["model"],
        RUN_BUCKETS,
    )
    for model in sorted(by_model):
        jobs = by_model[model]
        tokens.add_metric([model], sum(j.completion_tokens or 0 for j in jobs))
        for status in sorted({j.status for j in jobs}):
            requests.add_metric([model, status], sum(1 for j in jobs if j.status == status))
        succeeded = [j for j in jobs if j.status == JobStatus.SUCCEEDED]
        add_latency([model], [(j.finished_at - j.created_at).total_seconds() for j in succeeded])
    yield tokens
    yield requests
    yield latency


# Progress keys the train worker records (worker/progress_callback.py, JobCallback.on_log) -> metric.
TRAINING_GAUGES = {
    "step": ("llmq_train_step", "Optimizer steps done by a running fine-tune."),
    "total_steps": ("llmq_train_total_steps", "Optimizer steps a running fine-tune will take."),
    "train_loss": ("llmq_train_loss", "Training loss of a running fine-tune (mean since its last report)."),
    "trained_tokens": ("llmq_train_trained_tokens", "Response tokens a running fine-tune has trained on."),
}


def _training_families(snapshot: Snapshot) -> Iterator[Metric]:
    families = {
        key: GaugeMetricFamily(name, documentation, labels=["job_id", "model"])
        for key, (name, documentation) in TRAINING_GAUGES.items()
    }
    val_loss = GaugeMetricFamily(
        "llmq_train_val_loss", "Newest validation loss of a running fine-tune.", labels=["job_id", "model"]
    )
    for training in snapshot.training:
        labels = [training.job_id, training.model]
        for key, family in families.items():
            value = getattr(training.progress, key)
            if value is not None:
                family.add_metric(labels, value)
        if training.val_loss is not None:
            val_loss.add_metric(labels, training.val_loss)
    yield from families.values()
    yield val_loss


def _workers_family(live: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(
        "llmq_workers_live",
        "Workers per kind with a fresh heartbeat, not draining (0: its jobs wait).",
        labels=["kind"],
    )
    for kind, count in sorted(live.items()):
        family.add_metric([kind], count)
    return family


class ServiceCollector(Collector):
    """Reads fresh figures from the database and the broker on every scrape."""

    def collect(self) -> Iterable[Metric]:
        settings = get_settings()
        now = utcnow()
        up = GaugeMetricFamily(
            "llmq_metrics_source_up", "1 when this scrape could read the source, else 0.", labels=["source"]
        )
        families: list[Metric] = []
        try:
            with get_sessionmaker()() as session:
                snapshot = read_snapshot(session, settings, now)
                live = workers.live_kinds(session, settings.worker_stale_seconds)
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreadable: %s", exc)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            families += [
                *_job_families(snapshot, now),
                *_window_families(snapshot, settings),
                *_training_families(snapshot),
                _workers_family(live),
            ]
        try:
            messages = broker_messages()
        except Exception as exc:  # whatever the transport raises: redis, kombu, OSError
            log.warning("metrics: broker unreadable: %s", exc)
            up.add_metric(["broker"], 0)
        else:
            up.add_metric(["broker"], 1)
            broker = GaugeMetricFamily(
                "llmq_broker_messages",
                "Messages waiting in the broker per queue (not yet delivered).",
                labels=["queue"],
            )
            for queue, count in sorted(messages.items()):
                broker.add_metric([queue], count)
            families.append(broker)
        yield up
        yield from families


@lru_cache
def registry() -> CollectorRegistry:
    """This process's registry: the service figures, the counters (this process's, or every gateway process's
    in multiprocess mode) and the gateway process's own (CPU, memory, GC)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(ServiceCollector())
    shared_dir = multiprocess_dir()
    if shared_dir is not None:
        MultiProcessCollector(collectors, path=shared_dir)  # type: ignore[no-untyped-call]
    else:
        for counter in GATEWAY_COUNTERS:
            collectors.register(counter)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        collectors.register(collector)
    return collectors
