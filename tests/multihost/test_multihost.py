"""llmq on several hosts that share no disk, only an S3 store, Postgres and Redis.

Hosts are network namespaces the test makes (tests/multihost/network.py), each process on a private,
empty disk of its own: "api" runs two gateways, "a" a train worker, "b" a generate worker, "c" a spare
train worker; "svc" runs Postgres, Redis and moto's S3 server, all private to this test and bound to the
bridge's address. A fine-tune trained on a is served by name on b; a second one, whose train worker on a
is killed with SIGKILL mid-run, resumes on c from the checkpoint a sealed into the store; every job is
submitted on one gateway and polled, waited for or streamed on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from cli.processes import Children, gateway_command, wait_ready, worker_command
from shared.statuses import TERMINAL
from tests.chaos.harness import PostgresCluster, RedisServer, log_messages, wait_for
from tests.multihost.network import SERVICES, SUBNET, Network, NoNamespaces
from tests.s3_server import S3Server

pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "worker" / "data" / "alpaca_sample.jsonl"
HOSTS = ["api", "a", "b", "c"]
BUCKET = "llmq"
TIMINGS: list[tuple[str, float]] = []


def hyperparameters(max_steps: int, save_every: int) -> dict[str, Any]:
    return {
        "max_steps": max_steps, "save_every_steps": save_every, "batch_size": 4, "learning_rate": 2e-3,
        "max_seq_len": 128, "lora_dropout": 0.0, "validation_split": 0.0,
    }  # fmt: skip


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network(HOSTS)
    try:
        net.create()
    except NoNamespaces as exc:
        print(f"multihost test skipped: {exc}")
        pytest.skip(f"cannot make network namespaces here: {exc}")
    try:
        yield net
    finally:
        net.destroy()


class Cluster:
    """The services on svc and the llmq processes on the hosts, with the test's view of them."""

    def __init__(self, net: Network, root: Path, tiny_model: Path) -> None:
        self.net = net
        self.root = root
        self.disk = root / "disk"  # each host's own tmpfs is mounted here, in that host's processes only
        self.disk.mkdir()
        self.tiny_model = tiny_model
        self.logs = root / "logs"
        self.svc = net.address(SERVICES)
        self.postgres = PostgresCluster(root / "pg", host=self.svc)
        (root / "pg").mkdir()
        (root / "redis").mkdir()
        self.redis = RedisServer(root / "redis", host=self.svc)
        self.s3 = S3Server(self.svc, 9000, root / "moto.log")
        self.children: Children | None = None
        self.database_url = ""

    # -- services, started from a thread inside svc (their processes start there) --

    def start_services(self) -> None:
        with self.net.inside(SERVICES):
            self.s3.proc = None
            self.s3.start()
            self.s3.create_bucket(BUCKET)
            self.postgres.init()
            self.postgres.start()
            self.redis.start()
            self.database_url = self.postgres.create_database()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("LLMQ_", "AWS_"))}
        env = {
            **inherited,
            "LLMQ_DATABASE_URL": self.database_url,
            "LLMQ_BROKER_URL": self.redis.url,
            **self.s3.env(f"s3://{BUCKET}/artifacts"),
            "LLMQ_DATA_DIR": str(self.disk / "data"),
            "LLMQ_BASE_MODEL": str(self.disk / "model"),
            "LLMQ_LEASE_SECONDS": "5",
            "LLMQ_REAPER_INTERVAL_SECONDS": "0.5",
            "LLMQ_REPUBLISH_AFTER_SECONDS": "2",
            "LLMQ_TORCH_THREADS": "1",
            "LLMQ_LOG_FORMAT": "text",
            "HF_HOME": str(self.disk / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HOME": str(self.disk / "home"),
            "TMPDIR": str(self.disk / "tmp"),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.children = Children(env=env, log_dir=self.logs)

    def stop(self) -> None:
        if self.children is not None:
            self.children.stop_all()
        self.redis.kill()
        self.postgres.stop()
        self.s3.stop()

    # -- llmq processes on the hosts --

    def start(self, name: str, host: str, command: list[str]) -> None:
        assert self.children is not None
        # Each host has its own copy of the base model (the gateway reads its config.json to check LoRA targets).
        self.children.start(name, self.net.command(host, self.disk, {"model": self.tiny_model}, command))

    def start_gateway(self, name: str, port: int) -> str:
        self.start(name, "api", gateway_command(self.net.address("api"), port))
        return f"http://{self.net.address('api')}:{port}"

    def start_worker(self, name: str, host: str, queue: str) -> None:
        self.start(name, host, worker_command(queue, f"{queue}-{host}@%h"))

    def wait_worker(self, name: str, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.children is not None
            proc = self.children.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited; log:\n{self.log(name)[-3000:]}")
            return " ready." in self.log(name)

        wait_for(ready, timeout, f"{name} to be ready")

    def kill(self, name: str) -> None:
        assert self.children is not None
        proc = self.children.procs.pop(name)
        proc.kill()
        proc.wait()

    def pid(self, name: str) -> int:
        assert self.children is not None
        return self.children.procs[name].pid

    def host_disk(self, name: str) -> Path:
        """The disk a running process sees at DISK (its own tmpfs), read through /proc."""
        return Path(f"/proc/{self.pid(name)}/root") / self.disk.relative_to("/")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def messages(self, name: str) -> list[str]:
        return list(log_messages(self.log(name)))

    def model_path(self, model_id: str) -> str:
        with psycopg.connect(self.postgres.dsn(self.database_url.rsplit("/", 1)[1])) as conn:
            row = conn.execute("SELECT path FROM fine_tuned_models WHERE id = %s", (model_id,)).fetchone()
        assert row is not None
        return str(row[0])

    def manifest(self, model_id: str) -> dict[str, Any]:
        with psycopg.connect(self.postgres.dsn(self.database_url.rsplit("/", 1)[1])) as conn:
            row = conn.execute("SELECT manifest FROM fine_tuned_models WHERE id = %s", (model_id,)).fetchone()
        assert row is not None
        return dict(row[0])


@pytest.fixture
def cluster(network: Network, tiny_model: Path) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="llmq-multihost-"))
    root.chmod(0o755)  # Postgres runs as its own OS user, under this folder
    made = Cluster(network, root, tiny_model)
    try:
        yield made
    finally:
        made.stop()
        keep = os.environ.get("LLMQ_CHAOS_KEEP_LOGS")
        if keep:
            shutil.copytree(made.logs, Path(keep) / f"multihost-{int(time.time())}", dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def timed(label: str, since: float) -> float:
    now = time.monotonic()
    TIMINGS.append((label, now - since))
    print(f"multihost: {label}: {now - since:.1f} s")
    return now


def fine_tune(client: httpx.Client, api: str, file_id: str, model: str, max_steps: int, save_every: int) -> str:
    created = client.post(
        f"{api}/v1/fine_tuning/jobs",
        json={
            "model": model,
            "training_file": file_id,
            "seed": 7,
            "suffix": "multihost",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters(max_steps, save_every)}},
        },
    )
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def finished_fine_tune(client: httpx.Client, api: str, job_id: str, timeout: float) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        job = client.get(f"{api}/v1/fine_tuning/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(terminal, timeout, f"fine-tune {job_id} to end", interval=0.2)
    return job


def generate(client: httpx.Client, submit_on: str, wait_on: str, model: str) -> dict[str, Any]:
    """A generation submitted on one gateway and waited for on the other; the finished job."""
    body = {"model": model, "prompt": "Give three tips for staying healthy.", "max_tokens": 8, "temperature": 0}
    submitted = client.post(f"{submit_on}/v1/generations", json=body)
    assert submitted.status_code == 202, submitted.text
    job: dict[str, Any] = client.get(f"{wait_on}/v1/generations/{submitted.json()['id']}?wait=60").json()
    assert job["status"] == "succeeded", job
    return job


def test_fine_tune_and_serve_across_hosts_that_share_no_disk_resuming_on_another_host(cluster: Cluster) -> None:
    started = time.monotonic()
    cluster.start_services()
    step = timed("namespaces, Postgres, Redis and S3 server up", started)
    net, model = cluster.net, str(cluster.disk / "model")

    with net.inside(SERVICES), httpx.Client(timeout=30) as client:
        gw1 = cluster.start_gateway("gateway-1", 8001)
        gw2 = cluster.start_gateway("gateway-2", 8002)
        cluster.start_worker("train-a", "a", "train")
        cluster.start_worker("generate-b", "b", "generate")
        wait_ready(gw1, cluster.children, timeout=120)
        wait_ready(gw2, cluster.children, timeout=120)
        cluster.wait_worker("train-a")
        cluster.wait_worker("generate-b")
        step = timed("two gateways on api, train worker on a, generate worker on b ready", step)

        uploaded = client.post(
            f"{gw1}/v1/files", files={"file": ("alpaca.jsonl", SAMPLE.read_bytes())}, data={"purpose": "fine-tune"}
        )
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        assert (
            client.get(f"{gw2}/v1/files/{file_id}").json()["sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
        )

        # 1. Trained on a, served by name on b; submitted on one gateway, followed on the other.
        first = fine_tune(client, gw1, file_id, model, max_steps=4, save_every=2)
        job = finished_fine_tune(client, gw2, first, timeout=120)
        assert job["status"] == "succeeded", job
        first_model = job["fine_tuned_model"]
        step = timed("fine-tune 1 trained on a (4 steps)", step)
        generated = generate(client, gw1, gw2, first_model)
        assert generated["model"] == first_model and generated["outputs"][0]["completion_tokens"] > 0
        assert generate(client, gw2, gw1, first_model)["outputs"] == generated["outputs"]  # the other way round
        step = timed("adapter 1 fetched by b and served; generations submitted and waited on different gateways", step)

        # A streamed completion on gateway 2 of that adapter: b's deltas reach it through Redis.
        with client.stream(
            "POST",
            f"{gw2}/v1/completions",
            json={"model": first_model, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True},
        ) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and any(json.loads(x[6:]).get("choices") for x in lines[:-1]), lines

        # 2. Killed on a mid-run (after its first sealed checkpoint), resumed on c from the store.
        second = fine_tune(client, gw1, file_id, model, max_steps=24, save_every=3)

        def first_checkpoint() -> list[int]:
            listed = client.get(f"{gw2}/v1/fine_tuning/jobs/{second}/checkpoints").json()["data"]
            return sorted(c["step_number"] for c in listed)

        wait_for(first_checkpoint, 120, "the first checkpoint of fine-tune 2", interval=0.05)
        cluster.kill("train-a")
        killed = timed("fine-tune 2 checkpointed on a; a killed with SIGKILL", step)
        at_kill = client.get(f"{gw2}/v1/fine_tuning/jobs/{second}").json()
        assert at_kill["status"] == "running", at_kill
        cluster.start_worker("train-c", "c", "train")
        job = finished_fine_tune(client, gw2, second, timeout=240)
        assert job["status"] == "succeeded", job
        step = timed("fine-tune 2 resumed and finished on c", killed)
        events = client.get(f"{gw1}/v1/fine_tuning/jobs/{second}/events?limit=1000").json()["data"]
        resumed = [
            int(m.group(1))
            for e in events
            if (m := re.fullmatch(r"Resuming from the checkpoint at step (\d+)\.", e["message"]))
        ]
        assert len(resumed) == 1 and 0 < resumed[0] < 24, [e["message"] for e in events]
        fetched = [m for m in cluster.messages("train-c") if "fetched checkpoint" in m]
        assert fetched and f"jobs/{second}/attempt-1/checkpoints/checkpoint-{resumed[0]} " in fetched[0] + " ", fetched
        assert cluster.model_path(job["fine_tuned_model"]) == f"adapters/{second}/attempt-2", job
        second_model = job["fine_tuned_model"]
        generate(client, gw1, gw2, second_model)
        step = timed("adapter 2 (trained on a and c) served on b", step)

        # No host read another's disk: each process sees its own tmpfs at DISK, and what b serves is what it
        # fetched from the store into it, checked against the manifest.
        alive = ["gateway-1", "gateway-2", "generate-b", "train-c"]
        devices = {name: cluster.host_disk(name).stat().st_dev for name in alive}
        assert len(set(devices.values())) == len(alive) and cluster.disk.stat().st_dev not in devices.values()
        assert list(cluster.disk.iterdir()) == [], "something was written to the machine's own disk"
        cache = cluster.host_disk("generate-b") / "data" / "adapter-cache"
        for model_id in (first_model, second_model):
            manifest = cluster.manifest(model_id)
            job_id = model_id.rsplit(":", 1)[1]
            attempt = 1 if model_id == first_model else 2
            folder = cache / f"adapters__{job_id}__attempt-{attempt}"
            for name, entry in manifest["files"].items():
                assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], (model_id, name)
        fetches = [m for m in cluster.messages("generate-b") if "fetched from the artifact store" in m]
        assert len(fetches) == 2, fetches  # each adapter once, then from b's own cache
        for gateway in ("gateway-1", "gateway-2"):
            scratch = cluster.host_disk(gateway) / "data" / "scratch"
            assert not scratch.exists() or not any(scratch.rglob("*.jsonl")), "an upload was left on a gateway"
            assert not (cluster.host_disk(gateway) / "data" / "artifacts").exists()
        assert not (cluster.host_disk("train-c") / "data" / "artifacts").exists()
        for host in HOSTS:
            routes = net.routes(host)
            assert routes and all(r.startswith(f"{SUBNET}.0/24 ") for r in routes), (host, routes)
    timed("whole test", started)
