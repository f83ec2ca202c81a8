"""One bad job fails alone: whatever goes wrong with one job of a generation batch (its row, its adapter, its
prompt, its decoding, its result) fails that job with its own code while the rest of the batch succeeds in the
same pass. Real Postgres, real Redis, the real tiny GPT-2 and real LoRA adapters; the last test runs a real
gateway and Celery worker process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cli.processes import worker_command
from tests.process_settings import configure
from tests.servers import redis_db
from tests.systems import start_system
from tests.test_adapters import make_adapter, publish

BAD_PROMPT = "__test: the tokenizer refuses this prompt__"


@pytest.fixture
def own_base(tiny_model: Path, tmp_path: Path) -> str:
    """The tiny model under a path of this test's own: jobs on it are claimed by no other test's worker."""
    link = tmp_path / "isolated-base"
    link.symlink_to(tiny_model, target_is_directory=True)
    return str(link)


@pytest.fixture
def worker_settings(postgres_url: str, quiet_redis_url: str, own_base: str, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # fmt: skip
    configure(monkeypatch, database_url=postgres_url, broker_url=quiet_redis_url, base_model=own_base,
              quantization="fp32", device="cpu", data_dir=str(tmp_path))  # fmt: skip
    from shared.settings import get_settings

    yield get_settings()


def add_job(base: str, tenant: str, params: dict[str, Any], model: str | None = None) -> str:
    """A queued generation job; params are stored as given (a row of the wrong shape too, as an older gateway
    or a hand-written row can leave one)."""
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import GenerationParams
    from shared.models import Job

    with get_sessionmaker()() as session:
        job = job_states.create_job(session, kind="generate", model=model or base, base_model=base,
                                    params=GenerationParams(prompts=["placeholder"]), max_attempts=3,
                                    tenant=tenant)  # fmt: skip
        session.flush()
        session.execute(update(Job).where(Job.id == job.id).values(params=params))
        session.commit()
        time.sleep(0.002)  # distinct created_at: the claim takes the oldest first
        return job.id


def good_params(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompts": [prompt], "max_tokens": 4, "temperature": 0, "top_p": 1.0, "n": 1, "stop": None,
            "seed": None} | extra  # fmt: skip


def rows(ids: list[str]) -> dict[str, Any]:
    from shared.db import get_sessionmaker
    from shared.models import Job

    with get_sessionmaker()() as session:
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}


def test_job_whose_row_cannot_be_prepared_fails_alone_in_the_same_pass(worker_settings: Any) -> None:
    from worker.serving import ModelHolder, serve_waiting_jobs

    base = worker_settings.base_model
    good = [add_job(base, "bob", good_params(f"Hello {i}")) for i in range(6)]
    # What an older gateway or a hand-written row can leave: max_tokens that is not a number.
    bad = add_job(base, "alice", good_params("Hello", max_tokens="ten"))
    good += [add_job(base, "bob", good_params(f"Hi {i}")) for i in range(6)]

    served = serve_waiting_jobs(worker_settings, ModelHolder(worker_settings))

    assert sorted(served) == sorted([*good, bad])  # one pass claimed all thirteen
    found = rows([*good, bad])
    assert {found[i].status for i in good} == {"succeeded"}
    assert {found[i].result["batch_size"] for i in good} == {12}
    assert found[bad].status == "failed" and found[bad].attempt == 1
    assert found[bad].error["code"] == "preparation_failed"
    assert "max_tokens" in found[bad].error["message"]


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.timeout(120)  # before the fix the continuous loop kept such a job running for ever
def test_job_row_holding_no_prompt_fails_alone_instead_of_running_for_ever(worker_settings: Any, batching: str) -> None:
    from worker.serving import ModelHolder, serve_waiting_jobs

    settings = worker_settings.model_copy(update={"batching": batching})
    base = settings.base_model
    good = [add_job(base, "bob", good_params(f"Hello {i}")) for i in range(3)]
    empty = add_job(base, "alice", good_params("unused") | {"prompts": []})  # the gateway refuses it; a row may not

    served = serve_waiting_jobs(settings, ModelHolder(settings))

    assert sorted(served) == sorted([*good, empty])
    found = rows([*good, empty])
    assert {found[i].status for i in good} == {"succeeded"}
    assert found[empty].status == "failed" and found[empty].error["code"] == "preparation_failed"
    assert "no prompts" in found[empty].error["message"]


def test_one_broken_adapter_fails_only_the_jobs_that_name_it(worker_settings: Any, tmp_path: Path) -> None:
    from shared import job_states
    from shared.artifacts import ADAPTER_SEAL, ArtifactStore
    from shared.db import get_sessionmaker
    from shared.job_data import FineTuneParams
    from shared.models import FineTunedModel
    from worker.serving import ModelHolder, serve_waiting_jobs

    base = worker_settings.base_model
    make_adapter(Path(base), tmp_path / "local" / "good", seed=1)
    broken = tmp_path / "local" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    store = ArtifactStore.from_settings(worker_settings)
    files = {name: store.put_sealed(tmp_path / "local" / name, f"adapters/{name}", ADAPTER_SEAL, {})
             for name in ("good", "broken")}  # fmt: skip
    with get_sessionmaker()() as session:
        for name in ("good", "broken"):
            owner = job_states.create_job(session, kind="train", model=base, base_model=base,
                                          params=FineTuneParams(hyperparameters={}), max_attempts=1,
                                          tenant="alice")  # fmt: skip
            session.flush()
            session.add(FineTunedModel(id=f"ft:tiny:{name}:{owner.id}", tenant="alice", job_id=owner.id,
                                       base_model=base, path=f"adapters/{name}",
                                       manifest={"files": files[name]}))  # fmt: skip
        session.commit()
        good_model, broken_model = (session.scalars(select(FineTunedModel.id).where(FineTunedModel.path == p)).one()
                                    for p in ("adapters/good", "adapters/broken"))  # fmt: skip

    on_base = add_job(base, "bob", good_params("Hello"))
    on_good = add_job(base, "alice", good_params("Hello"), model=good_model)
    on_broken = add_job(base, "alice", good_params("Hello"), model=broken_model)

    serve_waiting_jobs(worker_settings, ModelHolder(worker_settings))

    found = rows([on_base, on_good, on_broken])
    assert found[on_base].status == "succeeded" and found[on_good].status == "succeeded"
    assert found[on_broken].status == "failed" and found[on_broken].error["code"] == "adapter_load_failed"
    assert broken_model in found[on_broken].error["message"]


def test_decoding_failure_is_narrowed_down_to_the_job_that_causes_it(tiny_model: Path, tmp_path: Path) -> None:
    from shared.artifacts import ArtifactStore
    from worker.adapter_cache import AdapterDiskCache
    from worker.adapters import AdapterCache
    from worker.generation import Request, SamplingParams, generate
    from worker.model_loading import load_base_model
    from worker.serving import PreparedJob, decode_isolating

    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    store = ArtifactStore((tmp_path / "store").as_uri(), {"auto_mkdir": True})
    cache = AdapterCache(loaded, capacity=2, disk=AdapterDiskCache(store, tmp_path / "cache", 2**30))
    names = cache.ensure({"ft:a": publish(store, make_adapter(tiny_model, tmp_path / "a", seed=3), "a")})
    greedy = SamplingParams(max_new_tokens=5, temperature=0)
    prompts = ["Hello", "The quick brown fox", "Below is", "Reverse", "One", "Two", "Three"]
    jobs = [PreparedJob(i, f"job{i}", [Request(p, greedy, adapter=names["ft:a"] if i % 2 else None)], [None])
            for i, p in enumerate(prompts)]  # fmt: skip
    # peft itself refuses, in the middle of the batched forward pass, a row naming an adapter it does not hold.
    jobs[4] = PreparedJob(4, "job4", [Request("One", greedy, adapter="ft_not_loaded")], [None])

    decoded = decode_isolating(loaded, jobs, max_batch_size=32)

    assert isinstance(decoded[4], str) and "ft_not_loaded" in decoded[4]
    for job, done in zip(jobs, decoded, strict=True):
        if job.index != 4:
            assert not isinstance(done, str)
            assert done[0] == generate(loaded, job.requests)  # token-identical to decoding it alone


def test_result_the_database_refuses_fails_only_its_job(worker_settings: Any) -> None:
    from shared import job_states
    from shared.db import get_sessionmaker
    from shared.job_data import GenerationResult, Usage
    from worker.serving import _write_back

    base = worker_settings.base_model
    ids = [add_job(base, "bob", good_params(f"Hello {i}")) for i in range(3)]
    with get_sessionmaker()() as session:
        claims = job_states.claim_batch(session, kind="generate", base_model=base, worker="test", lease_seconds=30,
                                        limit=10)  # fmt: skip
        ok = GenerationResult(outputs=[], usage=Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1))
        # A value the JSON column cannot serialize (NUL, surrogates and NaN are scrubbed on the way in since
        # migration 0006): an integer of more than 4300 digits, which Python's JSON encoder refuses. A real
        # value-level refusal of one job's result, raised while writing.
        huge = ok.model_copy(update={"batch_size": 10**5000})
        outcomes = [(ok, None), (huge, None), (ok, None)]
        _write_back(session, claims, outcomes)
    found = rows(ids)
    refused = claims[1].job_id
    assert found[refused].status == "failed" and found[refused].error["code"] == "result_not_storable"
    assert {found[c.job_id].status for c in (claims[0], claims[2])} == {"succeeded"}


def test_text_streamed_before_a_batch_failed_is_not_streamed_again(worker_settings: Any, tiny_model: Path) -> None:
    from shared.notify import stream_channel
    from worker.model_loading import load_base_model
    from worker.streaming import DeltaPublisher, StreamRow

    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    tokens = loaded.tokenizer("Hello there, this is a longer text", add_special_tokens=False)["input_ids"]
    row = StreamRow("gen-stream-test", 1, 0, ())
    sent: dict[tuple[str, int], str] = {}
    listener = redis.Redis.from_url(worker_settings.resolved_broker_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(stream_channel(row.job_id))
    DeltaPublisher(loaded, [row], sent)([tokens[:3]])  # the first run, which then failed
    DeltaPublisher(loaded, [row], sent)([tokens[:2]])  # the re-run catching up: nothing new
    DeltaPublisher(loaded, [row], sent)([tokens[:3]])
    DeltaPublisher(loaded, [row], sent)([tokens])  # only what goes beyond the first run's text
    messages = []
    deadline = time.monotonic() + 5
    while len(messages) < 2 and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.5)
        if message is not None:
            messages.append(message["data"].decode())
    listener.close()
    texts = [json.loads(m)["deltas"]["0"] for m in messages]
    assert "".join(texts) == loaded.tokenizer.decode(tokens)
    assert len(texts) == 2


@pytest.mark.e2e
def test_poisoned_job_fails_at_once_while_another_tenants_twelve_succeed_in_the_same_pass(
    postgres_url: str, own_base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from shared.api_keys import create_key
    from shared.db import make_engine

    data = tmp_path_factory.mktemp("isolation")
    broker = redis_db(11)  # queues of this system alone
    redis.Redis.from_url(broker).flushdb()
    with Session(make_engine(postgres_url)) as session:
        alice, bob = ({"Authorization": f"Bearer {create_key(session, t, 'test').token}"} for t in ("alice", "bob"))
    env = {"LLMQ_DATABASE_URL": postgres_url, "LLMQ_BROKER_URL": broker, "LLMQ_DATA_DIR": str(data),
           "LLMQ_BASE_MODEL": own_base, "LLMQ_REQUIRE_API_KEYS": "true", "HF_HUB_OFFLINE": "1",
           "LLMQ_FAULT_RAISE_ON_PROMPT": BAD_PROMPT}  # fmt: skip
    system = start_system(env, data / "logs", queues=())  # the worker starts once every job waits
    try:
        url = f"{system.base_url}/v1/generations"
        body = {"max_tokens": 4, "temperature": 0}
        good = [httpx.post(url, json=body | {"prompt": f"Hello {i}"}, headers=bob).json()["id"] for i in range(6)]
        poisoned = httpx.post(url, json=body | {"prompt": BAD_PROMPT}, headers=alice).json()["id"]
        good += [httpx.post(url, json=body | {"prompt": f"Hi {i}"}, headers=bob).json()["id"] for i in range(6)]
        system.children.start("worker-generate", worker_command("generate"))
        deadline = time.monotonic() + 120
        answers: dict[str, Any] = {}
        for job_id, key in [(poisoned, alice)] + [(g, bob) for g in good]:
            while time.monotonic() < deadline:
                system.children.check_alive()
                got = httpx.get(f"{url}/{job_id}", params={"wait": 10}, headers=key, timeout=20).json()
                if got["status"] not in ("queued", "running"):
                    answers[job_id] = got
                    break
        assert len(answers) == 13, "jobs still unfinished after 120 s"
        assert answers[poisoned]["status"] == "failed" and answers[poisoned]["attempt"] == 1
        assert answers[poisoned]["error"]["code"] == "preparation_failed"
        assert "fault injection" in answers[poisoned]["error"]["message"]
        assert {answers[g]["status"] for g in good} == {"succeeded"}
        assert {answers[g]["attempt"] for g in good} == {1}
        log = (data / "logs" / "worker-generate.log").read_text()
        assert log.count("claimed 13 jobs") == 1 and "claimed 1 jobs" not in log  # one pass, nobody re-ran
    finally:
        system.children.stop_all()
