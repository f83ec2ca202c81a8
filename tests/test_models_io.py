"""Models in and out through the official openai SDK, against real processes (gateway, train and generate
workers) on their own Postgres database and Redis db: result files, checkpoints served as models, exports loaded
with plain transformers, pause and resume, deleting a model."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.systems import System, isolated_system

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "data" / "alpaca_sample.jsonl"
# How long a tiny fine-tune may take to end (a machine shared with other test runs may need more).
FINISH_SECONDS = float(os.environ.get("LLMQ_TEST_FINISH_SECONDS", "280"))
FAST = {"batch_size": 8, "learning_rate": 2e-3, "max_seq_len": 128, "lora_dropout": 0.0, "lora_r": 4}


@pytest.fixture(scope="module")
def system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway + train and generate workers on a database and Redis db of their own (no other system's
    workers claim these jobs), serving the tiny GPT-2 unquantized (fp32: what an export's merged weights must
    reproduce; nf4 serving is covered by the other end-to-end systems). Fine-tunes still train on nf4."""
    data = tmp_path_factory.mktemp("models-io")
    with isolated_system(
        "llmq_models_io", 11, tiny_model, data, ("generate", "train"), LLMQ_QUANTIZATION="fp32"
    ) as system:
        yield system


def sdk(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="unused", max_retries=0)


def until(check: Callable[[], Any], timeout: float, what: str, system: System) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        system.children.check_alive()
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def fine_tune(client: openai.OpenAI, system: System, **hyper: Any) -> str:
    uploaded = client.files.create(file=SAMPLE.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=system.env["LLMQ_BASE_MODEL"],
        training_file=uploaded.id,
        suffix="io",
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {**FAST, **hyper}}},  # type: ignore[typeddict-unknown-key]
    )
    return job.id


def finished(client: openai.OpenAI, system: System, job_id: str, timeout: float = FINISH_SECONDS) -> Any:
    def done() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled", "paused") else None

    return until(done, timeout, f"fine-tune {job_id} finished", system)


def complete(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt="Give three tips", max_tokens=6, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def trained(system: System) -> Any:
    """A succeeded 6-step fine-tune with checkpoints at steps 3 and 6."""
    client = sdk(system)
    job = finished(client, system, fine_tune(client, system, max_steps=6, save_every_steps=3))
    assert job.status == "succeeded", job.error
    return job


def test_result_files_are_the_tenants_files_streamed_by_files_content(system: System, trained: Any) -> None:
    client = sdk(system)
    model = trained.fine_tuned_model
    assert model == f"ft:{Path(system.env['LLMQ_BASE_MODEL']).name}:io:{trained.id}"
    archive_id, metrics_id = trained.result_files
    assert client.files.retrieve(archive_id).purpose == "fine-tune-results"
    assert {archive_id, metrics_id} <= {f.id for f in client.files.list().data}
    with tarfile.open(fileobj=io.BytesIO(client.files.content(archive_id).read())) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(tar.getnames())
    assert manifest["fine_tuned_model"] == model and manifest["lineage"] == [system.env["LLMQ_BASE_MODEL"]]
    rows = list(csv.DictReader(io.StringIO(client.files.content(metrics_id).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["train_loss"]) > 0 and float(r["learning_rate"]) >= 0 and int(r["tokens"]) for r in rows)


def test_checkpoints_serve_as_models_in_completions_and_generations(system: System, trained: Any) -> None:
    client, model = sdk(system), trained.fine_tuned_model
    checkpoints = client.fine_tuning.jobs.checkpoints.list(trained.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]
    ids = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert ids == [f"{model}:ckpt-step-6", f"{model}:ckpt-step-3"]
    assert client.models.retrieve(ids[1]).id == ids[1]
    assert ids[1] not in [m.id for m in client.models.list().data]  # served, not listed
    assert complete(client, ids[0]) == complete(client, model)  # the last checkpoint holds the published weights
    complete(client, ids[1])
    ask = {"prompt": "Hi", "model": ids[1], "max_tokens": 3}
    generation = httpx.post(f"{system.base_url}/v1/generations", json=ask).json()
    done = httpx.get(f"{system.base_url}/v1/generations/{generation['id']}", params={"wait": 60}).json()
    assert done["status"] == "succeeded", done
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{model}:ckpt-step-4", prompt="x", max_tokens=2)


def test_continued_fine_tune_starts_from_a_checkpoint_and_records_the_chain(system: System, trained: Any) -> None:
    client = sdk(system)
    start = f"{trained.fine_tuned_model}:ckpt-step-3"
    uploaded = client.files.create(file=SAMPLE.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=start, training_file=uploaded.id, suffix="more",
        method={"type": "supervised", "supervised": {"hyperparameters": {**FAST, "max_steps": 2}}},  # type: ignore[typeddict-unknown-key]
    )  # fmt: skip
    assert job.model == start
    done = finished(client, system, job.id)
    assert done.status == "succeeded", done.error
    assert client.models.retrieve(done.fine_tuned_model).parent == start
    with tarfile.open(fileobj=io.BytesIO(client.files.content(done.result_files[0]).read())) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest["parent_model"] == start
    assert manifest["lineage"] == [start, system.env["LLMQ_BASE_MODEL"]]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert f"Continuing from {start}." in messages
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=f"{trained.fine_tuned_model}:ckpt-step-5", training_file=uploaded.id)


# --- Exports: the adapter merged into the unquantized base, downloaded, loaded with plain transformers -----------

PROMPTS = ["Give three tips", "The capital of France is", "Once upon a time"]
NEW_TOKENS = 8
# Largest |log p| difference allowed between the float32 export and the adapter on the nf4 base (the generate
# worker's loader), per token of the nf4 greedy text. Measured 0.05-0.07 on the tiny GPT-2 after 4-6 steps (this CPU
# has no AVX512-BF16), while the adapter itself moves them by about 1.4; the bound leaves room for other CPUs' bf16
# rounding and stays well below what an unmerged export would differ by.
NF4_LOGPROB_TOLERANCE = 0.25


def export(system: System, job_id: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{system.base_url}/v1/fine_tuning/jobs/{job_id}/export", json=body, timeout=30)


def exported(system: System, job_id: str, into: Path, **body: Any) -> tuple[dict[str, Any], float]:
    """Exports, waits for the export, downloads and unpacks it into `into`; the export and its seconds."""
    started = time.monotonic()
    created = export(system, job_id, **body)
    assert created.status_code == 202, created.text
    url = f"{system.base_url}/v1/fine_tuning/jobs/{job_id}/exports/{created.json()['id']}"
    deadline = time.monotonic() + 240
    while (done := httpx.get(url).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, done
        system.children.check_alive()
        time.sleep(0.1)
    seconds = time.monotonic() - started
    assert done["status"] == "succeeded", done
    content = sdk(system).files.content(done["file_id"]).read()
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        tar.extractall(into, filter="data")
    return done, seconds


@pytest.fixture(scope="module")
def float32_export(system: System, trained: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("float32-export")
    done, seconds = exported(system, trained.id, folder, dtype="float32")
    print(f"float32 export of the tiny model: {seconds:.1f} s request to downloaded, {done['bytes']} bytes")
    assert done["model"] == trained.fine_tuned_model and done["dtype"] == "float32"
    return folder


def served(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, list[float]]:
    """llmq's greedy completion of prompt and each generated token's log probability."""
    choice = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=1
    ).choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    return choice.text, [float(p) for p in choice.logprobs.token_logprobs]


def greedy(model: Any, tokenizer: Any, prompt: str) -> tuple[str, list[int]]:
    """Plain transformers greedy decoding: the text and the new token ids."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def token_logprobs(model: Any, tokenizer: Any, prompt: str, text: str) -> list[float]:
    """log p of each token of text after prompt under model (teacher forced)."""
    import torch

    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    text_ids = tokenizer(text, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, text_ids], dim=1)
    with torch.no_grad():
        logits = model(ids).logits.float()  # [1, seq, vocab]
    logp = torch.log_softmax(logits[0, prompt_ids.shape[1] - 1 : -1], dim=-1)
    return logp.gather(1, text_ids[0].unsqueeze(1)).squeeze(1).tolist()


def test_export_is_a_hugging_face_folder_that_loads_without_peft_and_serves_like_llmq(
    system: System, trained: Any, float32_export: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in float32_export.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(name.startswith("adapter_") for name in names)  # merged: nothing for peft to load
    model = AutoModelForCausalLM.from_pretrained(float32_export)
    tokenizer = AutoTokenizer.from_pretrained(float32_export)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.float32
    assert "### Response:" in (tokenizer.chat_template or "")  # the Alpaca chat template it was trained with
    card = (float32_export / "README.md").read_text()
    assert trained.fine_tuned_model in card and system.env["LLMQ_BASE_MODEL"] in card and "lora_r" in card
    client = sdk(system)
    for prompt in PROMPTS:
        text, logprobs = served(client, trained.fine_tuned_model, prompt)
        assert greedy(model, tokenizer, prompt)[0] == text, prompt
        mine = token_logprobs(model, tokenizer, prompt, text)
        assert max(abs(a - b) for a, b in zip(mine, logprobs, strict=True)) < 1e-3, prompt
    # The adapter changed the model: the export is not the base model in disguise.
    base_text, base_logprobs = served(client, system.env["LLMQ_BASE_MODEL"], PROMPTS[0])
    mine = token_logprobs(model, tokenizer, PROMPTS[0], base_text)
    assert max(abs(a - b) for a, b in zip(mine, base_logprobs, strict=True)) > 1e-3


def test_export_is_close_to_the_adapter_on_the_nf4_base(
    system: System, trained: Any, float32_export: Path, tmp_path: Path
) -> None:
    """The adapter on the nf4 base as a generate worker holds it (its loader, bitsandbytes nf4, the adapter with
    peft) sees rounded base weights; the export merges into the base's own weights, so their log probabilities
    agree within a tolerance, one smaller than what the adapter itself changes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.model_loading import load_base_model

    with tarfile.open(fileobj=io.BytesIO(sdk(system).files.content(trained.result_files[0]).read())) as tar:
        tar.extractall(tmp_path, filter="data")
    loaded = load_base_model(system.env["LLMQ_BASE_MODEL"], "main", "nf4", "cpu")
    nf4 = PeftModel.from_pretrained(loaded.model, str(tmp_path)).eval()
    model = AutoModelForCausalLM.from_pretrained(float32_export)
    tokenizer = AutoTokenizer.from_pretrained(float32_export)
    worst = adapter_effect = 0.0
    for prompt in PROMPTS:
        text, _ = greedy(nf4, loaded.tokenizer, prompt)
        theirs, mine = token_logprobs(nf4, tokenizer, prompt, text), token_logprobs(model, tokenizer, prompt, text)
        worst = max(worst, *(abs(a - b) for a, b in zip(theirs, mine, strict=True)))
        with nf4.disable_adapter():
            base = token_logprobs(nf4, tokenizer, prompt, text)
        adapter_effect = max(adapter_effect, *(abs(a - b) for a, b in zip(theirs, base, strict=True)))
    print(f"adapter on nf4 vs float32 export: max |logprob difference| {worst:.4f} (the adapter: {adapter_effect:.4f})")
    assert worst <= NF4_LOGPROB_TOLERANCE < adapter_effect


def test_llmq_export_follows_a_checkpoint_export_in_float16_and_unpacks_it(
    system: System, trained: Any, tmp_path: Path
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from cli.main import app

    checkpoint, folder = f"{trained.fine_tuned_model}:ckpt-step-3", tmp_path / "model"
    args = ["--url", system.base_url, "export", trained.id, "--checkpoint", checkpoint, "--follow", "-o", str(folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and result.stdout == f"{folder}\n", result.output
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}  # noqa: SIM118
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float16
    assert '"step": 3' in (folder / "README.md").read_text() and not list(folder.glob("*.tar"))
    (newest, *_) = httpx.get(f"{system.base_url}/v1/fine_tuning/jobs/{trained.id}/exports").json()["data"]
    assert (newest["model"], newest["dtype"], newest["status"]) == (checkpoint, "float16", "succeeded")
    shown = CliRunner().invoke(app, ["--url", system.base_url, "status", newest["id"]])
    assert shown.exit_code == 0 and "kind      export" in shown.stdout and "succeeded" in shown.stdout, shown.output


def test_exports_refuse_what_cannot_be_exported(system: System, trained: Any) -> None:
    others = stored_fine_tune(system, tenant="someone-else", status="succeeded")
    assert export(system, others).status_code == 404
    for status in ("failed", "running", "queued", "cancelled"):
        refused = export(system, stored_fine_tune(system, status=status))
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "job_not_succeeded" and status in refused.json()["error"]["message"]
    bad_dtype = export(system, trained.id, dtype="bfloat16")
    assert bad_dtype.status_code == 400 and bad_dtype.json()["error"]["param"] == "dtype", bad_dtype.text
    cancelled = stored_fine_tune(system, status="cancelled")
    of_another_job = export(system, cancelled, checkpoint=f"{trained.fine_tuned_model}:ckpt-step-3")
    assert of_another_job.status_code == 404, of_another_job.text
    assert export(system, trained.id, checkpoint=f"{trained.fine_tuned_model}:ckpt-step-4").status_code == 404
    assert httpx.get(f"{system.base_url}/v1/fine_tuning/jobs/{trained.id}/exports/ftexport-nope").status_code == 404


def stored_fine_tune(system: System, *, status: str, tenant: str = "default") -> str:
    """A fine-tuning job row in the given status, written straight into the database (no message sent)."""
    from shared import job_states
    from shared.job_data import FineTuneParams

    with connected(system) as session:
        job = job_states.create_job(
            session, kind="train", model=system.env["LLMQ_BASE_MODEL"], base_model=system.env["LLMQ_BASE_MODEL"],
            params=FineTuneParams(hyperparameters={}), max_attempts=3, tenant=tenant,
        )  # fmt: skip
        job.status = status
        session.commit()
        return str(job.id)


def test_deleting_a_model_unlists_and_unserves_it_and_keeps_its_history(system: System, trained: Any) -> None:
    client, model = sdk(system), trained.fine_tuned_model
    queued = queue_generation_without_message(system, model)
    deleted = client.models.delete(model)
    assert deleted.deleted and deleted.id == model
    assert model not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        complete(client, model)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(model)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(system.env["LLMQ_BASE_MODEL"])
    # A job queued before the delete fails with a clear code once a worker takes it.
    send_message(system, queued)
    failed = httpx.get(f"{system.base_url}/v1/generations/{queued}", params={"wait": 60}).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_deleted", failed
    # The job, its checkpoints (still served) and its result files stay.
    assert client.fine_tuning.jobs.retrieve(trained.id).fine_tuned_model == model
    complete(client, f"{model}:ckpt-step-3")
    assert client.files.content(trained.result_files[1]).text


def queue_generation_without_message(system: System, model: str) -> str:
    """A generation job queued for model, its message not yet sent (as if it waited behind others)."""
    from shared import job_states
    from shared.job_data import GenerationParams
    from shared.models import Job

    with connected(system) as session:
        job: Job = job_states.create_job(
            session, kind="generate", model=model, base_model=system.env["LLMQ_BASE_MODEL"],
            params=GenerationParams(prompts=["Hi"], max_tokens=2), max_attempts=3,
        )  # fmt: skip
        session.commit()
        return job.id


def send_message(system: System, job_id: str) -> None:
    from shared.celery_app import enqueue

    with connected(system):
        enqueue("generate", job_id)


@contextmanager
def connected(system: System) -> Iterator[Any]:
    """A session on the system's database, this process's settings pointed at its database and broker."""
    from shared.db import get_sessionmaker
    from tests.process_settings import reset_caches

    with pytest.MonkeyPatch.context() as mp:
        for key, value in system.env.items():
            if key.startswith("LLMQ_"):
                mp.setenv(key, value)
        reset_caches()
        try:
            with get_sessionmaker()() as session:
                yield session
        finally:
            mp.undo()
            reset_caches()


def test_pause_frees_the_worker_and_resume_continues_from_the_checkpoint(system: System) -> None:
    client = sdk(system)
    job_id = fine_tune(client, system, max_steps=20, save_every_steps=1000)
    until(lambda: client.fine_tuning.jobs.retrieve(job_id).status == "running", 120, "running", system)
    assert client.fine_tuning.jobs.pause(job_id).status in ("running", "paused")
    paused = finished(client, system, job_id)
    assert paused.status == "paused", paused.error
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert 0 < checkpoint.step_number < 20
    # The paused checkpoint serves as a model meanwhile; the train worker is free for another fine-tune.
    complete(client, checkpoint.fine_tuned_model_checkpoint)
    other = fine_tune(client, system, max_steps=2)
    assert finished(client, system, other).status == "succeeded"

    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job_id)  # already paused
    assert client.fine_tuning.jobs.resume(job_id).status == "queued"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job_id)  # queued or running, not paused
    done = finished(client, system, job_id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
    assert f"Resuming from the checkpoint at step {checkpoint.step_number}." in messages
    assert f"Fine-tuning paused at step {checkpoint.step_number}." in messages
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[1]).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))  # every step once, across both attempts
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job_id)  # finished
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job_id)
