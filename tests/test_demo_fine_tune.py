"""The demo's fine-tune, in process: it teaches llmq's small pretrained GPT-2 the Alpaca response format.

The same base model, data, hyperparameters and held-out instructions as `scripts/demo` (cli/demo.py), run
through the worker's own training and generation code on SQLite and an artifact store in tmp.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from cli import demo
from shared import job_states
from shared.artifacts import ArtifactStore, file_key
from shared.db import get_sessionmaker
from shared.fine_tuning import Hyperparameters
from shared.job_data import FineTuneParams, FineTuneResult
from shared.migrate import upgrade
from shared.models import File, FineTunedModel, Job, new_id
from shared.settings import Settings, get_settings
from tests.process_settings import configure
from worker.adapter_cache import AdapterDiskCache, StoredAdapter
from worker.adapters import AdapterCache
from worker.fine_tune import run_fine_tune
from worker.generation import Generation, Request, SamplingParams, generate
from worker.model_loading import load_base_model

pytestmark = [pytest.mark.slow]

# The fine-tune must remove at least this share of the base model's validation loss: it removed 36% on this
# machine (4.00 -> 2.56); learning to end with EOS alone is worth about 2% (one token of each answer).
MIN_VAL_LOSS_DROP = 0.25
TEMPLATE_TEXT = ("### Instruction", "### Response", "### Input", "Below is an instruction")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for an empty, migrated SQLite database and artifact store in tmp_path."""
    monkeypatch.delenv("LLMQ_BROKER_URL", raising=False)
    configure(
        monkeypatch,
        data_dir=str(tmp_path / "data"),
        database_url=f"sqlite:///{tmp_path / 'llmq.db'}",
        fine_tune_samples="0",  # this test generates its own answers to the held-out instructions
    )
    upgrade()
    return get_settings()


def add_file(settings: Settings, source: Path) -> str:
    """Stores source as an uploaded file (row + JSONL in the store); its id."""
    content = source.read_bytes()
    file_id = new_id("file")
    ArtifactStore.from_settings(settings).put_file(source, file_key(file_id))
    with get_sessionmaker()() as session:
        session.add(
            File(
                id=file_id,
                filename=source.name,
                purpose="fine-tune",
                bytes=len(content),
                records=len(content.splitlines()),
                sha256=hashlib.sha256(content).hexdigest(),
                path=file_key(file_id),
            )
        )
        session.commit()
    return file_id


def add_demo_job(model: str, training_file: str, validation_file: str) -> str:
    """The demo's fine-tuning job, queued as the gateway writes it; its id."""
    params = FineTuneParams(
        training_file=training_file,
        validation_file=validation_file,
        suffix="demo",
        seed=demo.SEED,
        hyperparameters=Hyperparameters(**demo.HYPERPARAMETERS).resolved().model_dump(),
    )
    with get_sessionmaker()() as session:
        job = job_states.create_job(session, kind="train", model=model, base_model=model, params=params, max_attempts=1)
        session.commit()
        return job.id


def answers(settings: Settings, model_dir: Path, adapter: StoredAdapter | None) -> list[Generation]:
    """Greedy answers to the demo's held-out prompts from the nf4 base, with the adapter when given."""
    loaded = load_base_model(str(model_dir), "main", "nf4", "cpu")
    name = None
    if adapter is not None:
        disk = AdapterDiskCache(ArtifactStore.from_settings(settings), settings.adapter_cache_dir, 2**30)
        name = AdapterCache(loaded, 1, disk).ensure({"ft:demo": adapter})["ft:demo"]
    params = SamplingParams(max_new_tokens=demo.MAX_TOKENS, temperature=0.0)
    return generate(loaded, [Request(prompt=p, params=params, adapter=name) for p in demo.held_out_prompts()])


def test_the_demo_fine_tune_teaches_the_response_format(store: Settings, pretrained_model: Path) -> None:
    started = time.monotonic()
    job_id = add_demo_job(
        str(pretrained_model), add_file(store, demo.TRAIN_FILE), add_file(store, demo.VALIDATION_FILE)
    )
    run_fine_tune(job_id, store)
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == "succeeded", job.error
        result = FineTuneResult.model_validate(job.result)
        model = session.get(FineTunedModel, result.fine_tuned_model)
        assert model is not None and result.adapter_path is not None and result.metrics is not None
        adapter = StoredAdapter(key=result.adapter_path, files=model.manifest.get("files"))
    seconds = time.monotonic() - started

    before = answers(store, pretrained_model, None)
    after = answers(store, pretrained_model, adapter)
    shown = "\n".join(
        f"base {b.finish_reason}: {b.text!r}\ntuned {a.finish_reason}: {a.text!r}"
        for b, a in zip(before, after, strict=True)
    )
    # The base model has never seen the template: it runs on to the token limit.
    assert all(g.finish_reason == "length" for g in before), shown
    # The fine-tuned model answers and stops with EOS, and no template text spills into its answers.
    assert all(g.finish_reason == "stop" and g.completion_tokens < demo.MAX_TOKENS for g in after), shown
    assert not any(marker in g.text for g in after for marker in TEMPLATE_TEXT), shown
    assert all(g.text.strip() for g in after), shown

    metrics = result.metrics
    assert metrics["val_loss"] <= (1 - MIN_VAL_LOSS_DROP) * metrics["base_val_loss"], (metrics, shown)
    print(f"\n{shown}\nval loss {metrics['base_val_loss']:.3f} -> {metrics['val_loss']:.3f}; fine-tune {seconds:.1f} s")
