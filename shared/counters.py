"""Prometheus counters and histograms kept in process memory (prometheus_client), named like vLLM's and TGI's.

The gateway counts requests and submissions; each worker counts what it runs and serves them on its own port
(`worker_metrics_port`, see worker/metrics.py). Several gateway processes on one port (uvicorn --workers N)
share their figures through prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` names a folder
each process writes its values to, and GET /metrics adds them up (`llmq serve --workers N` sets it).

Counters only go up: read them through rate() or increase(). The database-only gauges (queue depth, oldest
queued job) are in gateway/metrics.py.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Histogram

# Upper bounds, seconds. vLLM's request-latency bounds, cut to what a CPU service sees.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess_dir() -> str | None:
    """The folder several processes share their figures through, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# The gateway.
HTTP_REQUESTS = Counter(
    "llmq_http_requests", "HTTP requests answered, by method, route template and status.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "llmq_http_request_duration_seconds",
    "Time to answer an HTTP request (to the end of its body), by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
JOBS_SUBMITTED = Counter("llmq_jobs_submitted", "Jobs accepted (row committed and enqueued), by kind.", ["kind"])

# Both sides: a job ends at a worker (succeeded, failed) or at the gateway (cancelled while queued).
JOBS_FINISHED = Counter(
    "llmq_jobs_finished", "Jobs that reached a final status, by kind and status.", ["kind", "status"]
)
QUEUE_WAIT = Histogram(
    "llmq_request_queue_time_seconds",
    "Submission to claim of each job claimed (vLLM's request_queue_time), by kind.",
    ["kind"],
    buckets=WAIT_BUCKETS,
)

# What a gateway's GET /metrics shows of this process's memory (the workers serve theirs themselves).
GATEWAY_COUNTERS = (HTTP_REQUESTS, HTTP_DURATION, JOBS_SUBMITTED, JOBS_FINISHED, QUEUE_WAIT)
