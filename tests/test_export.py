"""Exporting a fine-tune as a standalone model, against real processes (gateway, train and generate workers) on
their own Postgres database and Redis db: the export job on the train queue, the downloaded folder loaded with
plain transformers (no peft), its greedy output against what llmq serves, and the refusals."""

from __future__ import annotations

import io
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
import redis
import torch

from tests.servers import TEST_DATABASE_URL, admin_dsn, redis_db
from tests.systems import System, start_system
from tests.test_models_io import connected, fine_tune, finished, sdk

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["Give three tips", "The capital of France is", "Once upon a time"]
NEW_TOKENS = 8
# Largest |log p| difference allowed between the float32 export and the served nf4 base + adapter, per token of
# the served greedy text. Measured on this tiny GPT-2 after 4 steps: see the note in docs/API.md.
NF4_LOGPROB_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway + train and generate workers on a database and Redis db of their own; the generate worker serves
    the tiny GPT-2 unquantized (fp32), so served output is what the merged float32 weights must reproduce."""
    from shared.migrate import upgrade

    name = f"llmq_export_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"{TEST_DATABASE_URL.rpartition('/')[0]}/{name}"
    upgrade(database_url)
    broker_url = redis_db(12)
    redis.Redis.from_url(broker_url).flushdb()
    data = tmp_path_factory.mktemp("export")
    env = {
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_BROKER_URL": broker_url,
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": str(tiny_model),
        "LLMQ_QUANTIZATION": "fp32",
        "HF_HUB_OFFLINE": "1",
    }
    started = start_system(env, data / "logs", queues=("generate", "train"))
    yield started
    started.children.stop_all()
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def trained(system: System) -> Any:
    """A succeeded 4-step fine-tune (trained on the nf4 base) with checkpoints at steps 2 and 4."""
    client = sdk(system)
    job = finished(client, system, fine_tune(client, system, max_steps=4, save_every_steps=2))
    assert job.status == "succeeded", job.error
    return job


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
    """nf4 serving (the generate worker's loader, bitsandbytes nf4 + the adapter with peft) rounds the base
    weights; the export merges into the base's own weights, so log probabilities agree within a tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.model_loading import load_base_model

    with tarfile.open(fileobj=io.BytesIO(sdk(system).files.content(trained.result_files[0]).read())) as tar:
        tar.extractall(tmp_path, filter="data")
    loaded = load_base_model(system.env["LLMQ_BASE_MODEL"], "main", "nf4", "cpu")
    nf4 = PeftModel.from_pretrained(loaded.model, str(tmp_path)).eval()
    model = AutoModelForCausalLM.from_pretrained(float32_export)
    tokenizer = AutoTokenizer.from_pretrained(float32_export)
    worst = 0.0
    for prompt in PROMPTS:
        text, _ = greedy(nf4, loaded.tokenizer, prompt)
        theirs, mine = token_logprobs(nf4, tokenizer, prompt, text), token_logprobs(model, tokenizer, prompt, text)
        worst = max(worst, *(abs(a - b) for a, b in zip(theirs, mine, strict=True)))
    print(f"nf4 served vs float32 export: max |logprob difference| {worst:.4f}")
    assert worst <= NF4_LOGPROB_TOLERANCE


def test_a_checkpoint_exports_in_float16(system: System, trained: Any, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    checkpoint = f"{trained.fine_tuned_model}:ckpt-step-2"
    done, _ = exported(system, trained.id, tmp_path, checkpoint=checkpoint)
    assert done["model"] == checkpoint and done["dtype"] == "float16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}  # noqa: SIM118
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.float16
    assert '"step": 2' in (tmp_path / "README.md").read_text()
    listed = httpx.get(f"{system.base_url}/v1/fine_tuning/jobs/{trained.id}/exports").json()["data"]
    assert done["id"] in [e["id"] for e in listed]


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
    of_another_job = export(system, cancelled, checkpoint=f"{trained.fine_tuned_model}:ckpt-step-2")
    assert of_another_job.status_code == 404, of_another_job.text
    assert export(system, trained.id, checkpoint=f"{trained.fine_tuned_model}:ckpt-step-3").status_code == 404
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
