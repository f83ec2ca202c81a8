"""Fine-tuning in process: QLoRA on the tiny GPT-2, a SQLite database and an artifact store in tmp.

No network: the base model is built offline, the data is the shipped Alpaca sample, and the one hub test
runs with the hub switched off.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from sqlalchemy import select, update
from transformers import AutoTokenizer

from shared import artifacts, job_states
from shared.artifacts import ADAPTER_SEAL, CHECKPOINT_SEAL, ArtifactStore
from shared.chat_templates import ALPACA_CHAT_TEMPLATE
from shared.db import get_sessionmaker
from shared.fine_tuning import Hyperparameters, ResolvedHyperparameters
from shared.job_data import FineTuneParams, FineTuneResult
from shared.migrate import upgrade
from shared.models import Checkpoint, File, FineTunedModel, Job, JobEvent, new_id
from shared.prompts import TEMPLATE, alpaca_prompt
from shared.settings import Settings, get_settings
from tests.process_settings import configure
from worker import adapter_publishing, fine_tune, progress_callback, trainer_setup
from worker.alpaca_data import (
    RESPONSE_PREFIX,
    TrainingData,
    completion,
    read_jsonl,
    split_validation,
    to_examples,
)
from worker.checkpoints import TRAINER_STATE, last_sealed_checkpoint
from worker.guarded_writes import ClaimLost
from worker.model_loading import compute_dtype, load_base_model

pytestmark = [
    # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5.24 deprecates.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

DATA = Path(__file__).resolve().parents[1] / "worker" / "data"
SAMPLE = DATA / "alpaca_sample.jsonl"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for an empty, migrated SQLite database and artifact store in tmp_path."""
    monkeypatch.delenv("LLMQ_BROKER_URL", raising=False)  # nothing to notify in process
    configure(monkeypatch, data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{tmp_path / 'llmq.db'}")
    upgrade()
    return get_settings()


def add_file(settings: Settings, source: Path = SAMPLE) -> str:
    """Stores source as an uploaded file (row + JSONL in the store); its id."""
    content = source.read_bytes()
    file_id = new_id("file")
    ArtifactStore.from_settings(settings).put_file(source, artifacts.file_key(file_id))
    with get_sessionmaker()() as session:
        session.add(
            File(
                id=file_id,
                filename=source.name,
                purpose="fine-tune",
                bytes=len(content),
                records=len(content.splitlines()),
                sha256=hashlib.sha256(content).hexdigest(),
                path=artifacts.file_key(file_id),
            )
        )
        session.commit()
    return file_id


def fetched(settings: Settings, key: str, seal: str, into: Path) -> Path:
    """A local copy of a sealed folder of the store (as another host would fetch it), checked against its seal."""
    store = ArtifactStore.from_settings(settings)
    folder = into / key.replace("/", "__")
    store.get_sealed(key, store.read_seal(key, seal)["files"], folder)
    return folder


def sealed_files(settings: Settings, key: str, seal: str) -> set[str]:
    """The files a stored folder's seal lists (ArtifactMissing when it is not sealed)."""
    return set(ArtifactStore.from_settings(settings).read_seal(key, seal)["files"])


def add_job(model: str, *, training_file: str | None = None, dataset: Any = None, **hyper: Any) -> str:
    """A queued train job as the gateway writes it; its id."""
    params = FineTuneParams(
        training_file=training_file,
        validation_file=None,
        dataset=dataset,
        suffix="test",
        seed=7,
        metadata={"case": "test"},
        hyperparameters=Hyperparameters(**hyper).resolved().model_dump(),
    )
    with get_sessionmaker()() as session:
        job = job_states.create_job(
            session, kind="train", model=model, base_model=model, params=params, max_attempts=3, tenant="acme"
        )
        session.commit()
        return job.id


def job_row(job_id: str) -> Job:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(job_id: str, type: str | None = None) -> list[JobEvent]:
    with get_sessionmaker()() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        if type:
            query = query.where(JobEvent.type == type)
        return list(session.scalars(query))


def checkpoints(job_id: str) -> list[Checkpoint]:
    with get_sessionmaker()() as session:
        query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        return list(session.scalars(query))


FAST = {"batch_size": 8, "learning_rate": 2e-3, "max_seq_len": 256, "lora_dropout": 0.0}


# ----------------------------------------------------------------------------------------------------------
# Data and loss masking
# ----------------------------------------------------------------------------------------------------------


def test_examples_use_the_stanford_prompt_and_a_spaced_response() -> None:
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Reverse.", "input": "a b", "output": "\nb a"},
    ]
    first, second = to_examples(records)
    assert first == {"prompt": alpaca_prompt("Name a colour."), "completion": RESPONSE_PREFIX + "Blue."}
    assert first["prompt"] == TEMPLATE["no_input"].format(instruction="Name a colour.")
    assert second["prompt"].endswith("### Input:\na b\n\n### Response:")
    assert second["completion"] == "\nb a" == completion("\nb a")  # already separated: left alone


def test_prompt_completion_records_train_as_given() -> None:
    records = [{"prompt": "Q: 1+2?\nA:", "completion": " 3"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    raw, alpaca = to_examples(records)
    assert raw == {"prompt": "Q: 1+2?\nA:", "completion": " 3"}
    assert alpaca == {"prompt": alpaca_prompt("Say hi", ""), "completion": " hi"}


def test_validation_split_is_seeded_and_disjoint() -> None:
    records = read_jsonl(SAMPLE, "sample")
    train, val = split_validation(records, 0.1, seed=3)
    assert len(val) == 40 and len(train) == 360
    assert split_validation(records, 0.1, seed=3) == (train, val)
    assert split_validation(records, 0.1, seed=4)[1] != val
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}
    assert split_validation(records, 0.0, seed=3) == (records, [])


@pytest.mark.parametrize("packing", [False, True])
def test_loss_is_on_the_response_and_its_eos_never_on_prompt_or_padding(tiny_model: Path, packing: bool) -> None:
    loaded = load_base_model(str(tiny_model), "main", "nf4", "cpu")
    trainer_setup.keep_4bit_trainable(loaded.model)  # changes nothing on a CPU without AVX512-BF16
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in loaded.model.modules())
    records = read_jsonl(SAMPLE, "sample")[:8]
    hp = Hyperparameters(batch_size=4, max_seq_len=256, packing=packing).resolved()
    trainer = trainer_setup.build_trainer(
        loaded, TrainingData(train=records, validation=[]), hp, seed=0, output_dir=Path("/nonexistent")
    )
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # so padding can only be told apart by position
    expected = sorted(completion(r["output"]) + tokenizer.eos_token for r in records)

    learned: list[str] = []
    for batch in trainer.get_train_dataloader():
        ids, labels = batch["input_ids"], batch["labels"]
        if packing:  # one flattened row; sequences restart their positions at 0
            starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), ids.shape[1]]
            rows = [(ids[0, a:b], labels[0, a:b]) for a, b in itertools.pairwise(starts)]
        else:
            assert (labels[batch["attention_mask"] == 0] == -100).all()  # padding is never learned
            assert (ids[batch["attention_mask"] == 0] == eos).all()  # although it is the EOS token
            rows = [
                (ids[i][batch["attention_mask"][i] == 1], labels[i][batch["attention_mask"][i] == 1])
                for i in range(len(ids))
            ]
        for row_ids, row_labels in rows:
            trained = (row_labels != -100).nonzero().flatten()
            # One contiguous span at the end of the sequence: the response, then EOS.
            assert trained.tolist() == list(range(int(trained[0]), len(row_ids)))
            assert int(row_labels[-1]) == eos
            learned.append(tokenizer.decode(row_ids[trained]))
            prompt = tokenizer.decode(row_ids[: int(trained[0])])
            assert prompt.endswith("### Response:")
    assert sorted(learned) == expected


def one_step(trainer: Any, batch: dict[str, Any]) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """A training step's loss, logged metrics and LoRA gradients on batch, without an optimizer step."""
    model = trainer.model
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in the base model for both heads
    bf16 = compute_dtype(torch.device("cpu")) == torch.bfloat16  # as the Trainer autocasts
    with trainer.compute_loss_context_manager(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in ("entropy", "mean_token_accuracy")}
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), metrics, grads


def test_the_head_projects_only_labelled_positions_with_trl_s_loss_metrics_and_gradients(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = read_jsonl(SAMPLE, "sample")[:8]
    hp = Hyperparameters(batch_size=8, max_seq_len=256, lora_dropout=0.0).resolved()

    def trainer(compact: bool) -> Any:
        loaded = load_base_model(str(tiny_model), "main", "nf4", "cpu")
        trainer_setup.keep_4bit_trainable(loaded.model)
        if not compact:  # TRL's own fused head, which projects every position on the CPU
            monkeypatch.setattr(trainer_setup, "score_only_labelled_positions", lambda *_: False)
        torch.manual_seed(0)  # the same LoRA initialisation for both
        built = trainer_setup.build_trainer(
            loaded, TrainingData(train=records, validation=[]), hp, seed=0, output_dir=Path("/nonexistent")
        )
        monkeypatch.undo()
        return built

    trl_trainer, ours = trainer(compact=False), trainer(compact=True)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    projected: list[int] = []
    head = ours.model.get_base_model().get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[0]))

    trl_loss, trl_metrics, trl_grads = one_step(trl_trainer, batch)
    loss, metrics, grads = one_step(ours, batch)

    assert projected == [labelled] and labelled < batch["labels"].numel() / 2  # the answers' positions only
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert metrics == pytest.approx(trl_metrics, rel=1e-5)
    assert grads.keys() == trl_grads.keys() and grads
    flat = torch.cat([g.flatten() for g in grads.values()])
    trl_flat = torch.cat([g.flatten() for g in trl_grads.values()])
    assert torch.nn.functional.cosine_similarity(flat, trl_flat, dim=0) > 0.9999
    assert (flat - trl_flat).norm() / trl_flat.norm() < 0.01  # rounding differs in the backward


def test_trl_s_own_head_stays_where_it_already_projects_labelled_positions_only(tiny_model: Path) -> None:
    from worker.completion_head import score_only_labelled_positions

    model = load_base_model(str(tiny_model), "main", "nf4", "cpu").model
    forward = model.forward
    assert not score_only_labelled_positions(model, torch.device("cuda"))
    assert model.forward == forward


@pytest.mark.parametrize(
    "field, value", [("logit_scale", 2.0), ("logits_scaling", 8.0), ("final_logit_softcapping", 30.0)]
)
def test_trl_s_own_head_stays_for_models_whose_logits_it_scales_or_caps(
    tiny_model: Path, field: str, value: float
) -> None:
    from worker.completion_head import score_only_labelled_positions

    model = load_base_model(str(tiny_model), "main", "nf4", "cpu").model
    setattr(model.config, field, value)
    forward = model.forward
    assert not score_only_labelled_positions(model, torch.device("cpu"))
    assert model.forward == forward
    setattr(model.config, field, None)
    assert score_only_labelled_positions(model, torch.device("cpu"))  # the same model without it


# ----------------------------------------------------------------------------------------------------------
# A whole fine-tune
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The trainer run_fine_tune builds, and every parameter's value before training."""
    seen: dict[str, Any] = {}
    real = fine_tune.build_trainer

    def spy(*args: Any, **kwargs: Any) -> Any:
        trainer = real(*args, **kwargs)
        seen["trainer"] = trainer
        seen["before"] = {n: p.data.detach().float().clone() for n, p in trainer.model.named_parameters()}
        return trainer

    monkeypatch.setattr(fine_tune, "build_trainer", spy)
    return seen


def greedy(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


@pytest.mark.slow
def test_fine_tune_learns_and_leaves_a_servable_adapter(
    store: Settings, tiny_model: Path, captured: dict[str, Any], tmp_path: Path
) -> None:
    file_id = add_file(store)
    job_id = add_job(str(tiny_model), training_file=file_id, n_epochs=2, save_every_steps=45, **FAST)

    fine_tune.run_fine_tune(job_id, store)

    job = job_row(job_id)
    assert job.status == "succeeded", job.error
    result = job.result or {}
    model_id = f"ft:{tiny_model.name}:test:{job_id}"
    assert result["fine_tuned_model"] == model_id
    metrics = result["metrics"]
    assert metrics["val_loss"] < metrics["base_val_loss"]
    assert metrics["steps"] == 90  # 2 epochs of 360 examples (40 of the 400 held out) in batches of 8
    assert result["trained_tokens"] == metrics["trained_tokens"] > 0

    # Greedy answers to the first held-out validation prompts, the fine-tuned model's beside the base's, bounded.
    samples = result["samples"]
    _, validation = split_validation(read_jsonl(SAMPLE, "sample"), 0.1, seed=7)
    assert [s["prompt"] for s in samples] == [
        "\n".join(p for p in (r["instruction"], r["input"]) if p) for r in validation[: store.fine_tune_samples]
    ]
    assert [s["reference"] for s in samples] == [r["output"] for r in validation[: store.fine_tune_samples]]
    assert all(isinstance(s["fine_tuned"], str) and isinstance(s["base"], str) for s in samples)
    assert any(s["fine_tuned"] != s["base"] for s in samples)
    assert "Answered 3 validation prompts greedily (fine-tuned and base)." in [e.message for e in events(job_id)]

    # Progress events: the loss falls; figures are complete; the last step is always written.
    progress = [e.data for e in events(job_id, "metrics") if e.data and "train_loss" in e.data]
    assert progress[-1]["step"] == 90 and progress[-1]["trained_tokens"] == result["trained_tokens"]
    assert progress[-1]["train_loss"] < progress[0]["train_loss"]
    for figures in progress:
        assert {"step", "total_steps", "learning_rate", "tokens_per_second", "eta_seconds"} <= set(figures)
    evaluations = [e.data for e in events(job_id, "metrics") if e.data and "train_loss" not in e.data]
    assert [d.get("base_val_loss") for d in evaluations][:1] == [metrics["base_val_loss"]]
    assert evaluations[-1]["val_loss"] == metrics["val_loss"]

    # Trained tokens are the response tokens (+ EOS) of the examples trained on, never prompt or padding.
    # Two whole epochs, so every training example was seen exactly twice.
    trainer = captured["trainer"]
    tokenizer = trainer.processing_class
    train_records, _ = split_validation(read_jsonl(SAMPLE, "sample"), 0.1, seed=7)
    response_tokens = sum(
        len(tokenizer(e["completion"] + tokenizer.eos_token)["input_ids"]) for e in to_examples(train_records)
    )
    assert result["trained_tokens"] == trainer.trained_tokens == 2 * response_tokens

    # LoRA weights changed, nothing else did.
    after = dict(trainer.model.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert not any(after[n].requires_grad for n in after if "lora_" not in n)
    assert all(not torch.equal(after[n].data.float(), captured["before"][n]) for n in lora if "lora_B" in n)
    for name, param in after.items():
        if "lora_" not in name:
            assert torch.equal(param.data.detach().float(), captured["before"][name]), name

    # The adapter: safetensors with LoRA tensors only, a manifest, a model row, servable at once.
    adapter = fetched(store, result["adapter_path"], ADAPTER_SEAL, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in key for key in weights)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    manifest = ArtifactStore.from_settings(store).read_seal(result["adapter_path"], ADAPTER_SEAL)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(manifest["files"])
    # The template it trained with, in its manifest and its tokenizer config (Alpaca records: the Alpaca one).
    assert manifest["chat_template"] == ALPACA_CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(adapter).chat_template == ALPACA_CHAT_TEMPLATE
    assert manifest["base_model"] == str(tiny_model)
    assert manifest["dataset"]["train"]["sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert manifest["prompt_template"] == TEMPLATE
    assert manifest["hyperparameters"]["n_epochs"] == 2
    assert manifest["metrics"] == metrics
    assert {"peft", "transformers"} <= set(manifest["versions"])
    assert_result_files(job_id, result["result_files"], tmp_path, steps=90)
    with get_sessionmaker()() as session:
        row = session.get(FineTunedModel, model_id)
        assert row is not None and row.job_id == job_id and row.path == result["adapter_path"]
        assert row.tenant == "acme"  # the model belongs to the tenant that trained it
        assert row.manifest == manifest

    # Checkpoints: every save_every_steps, recorded after they were complete.
    assert [c.step for c in checkpoints(job_id)] == [45, 90]
    for checkpoint in checkpoints(job_id):
        assert TRAINER_STATE in sealed_files(store, checkpoint.path, CHECKPOINT_SEAL)

    # Greedy generation with the adapter differs from the base model's.
    base = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    prompts = [
        alpaca_prompt(r["instruction"], r["input"]) for r in read_jsonl(DATA / "alpaca_sample_val.jsonl", "v")[:3]
    ]
    before = [greedy(base.model, base.tokenizer, p) for p in prompts]
    tuned = PeftModel.from_pretrained(base.model, adapter)
    assert [greedy(tuned, base.tokenizer, p) for p in prompts] != before


def assert_result_files(job_id: str, file_ids: list[str], tmp_path: Path, steps: int) -> None:
    """The job's result files: its tenant's rows (fine-tune-results), an adapter archive whose manifest is the
    published one, and a metrics CSV with a row per step."""
    store = ArtifactStore.from_settings(get_settings())
    with get_sessionmaker()() as session:
        rows = [session.get(File, file_id) for file_id in file_ids]
    assert [r.filename for r in rows if r] == [f"{job_id}-adapter.tar.gz", f"{job_id}-metrics.csv"]
    archive, table = rows
    assert archive and table and {r.tenant for r in (archive, table)} == {"acme"}
    assert {r.purpose for r in (archive, table)} == {"fine-tune-results"}
    local = tmp_path / "results"
    store.get_file(archive.path, local / "adapter.tar.gz")
    with tarfile.open(local / "adapter.tar.gz") as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json", "tokenizer.json"} <= names
    assert manifest["job_id"] == job_id and "adapter_model.safetensors" in manifest["files"]
    store.get_file(table.path, local / "metrics.csv")
    lines = list(csv.DictReader((local / "metrics.csv").open()))
    assert list(lines[0]) == ["step", "train_loss", "valid_loss", "learning_rate", "tokens"]
    assert [int(r["step"]) for r in lines] == list(range(1, steps + 1)) and table.records == steps
    assert all(float(r["train_loss"]) > 0 and int(r["tokens"]) > 0 for r in lines)
    assert float(lines[-1]["valid_loss"]) > 0  # the adapter's validation loss, evaluated after the last step


# ----------------------------------------------------------------------------------------------------------
# Cancel and resume
# ----------------------------------------------------------------------------------------------------------


def cancel_after_first_progress(job_id: str, seen: dict[str, Any]) -> threading.Thread:
    """A thread that cancels the job once it reports progress, noting the step it had reached."""

    def last_step() -> int | None:
        progress = [e.data for e in events(job_id, "metrics") if e.data and "train_loss" in e.data]
        return progress[-1]["step"] if progress else None

    def run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            step = last_step()
            if step is not None:
                seen["before"] = step
                with get_sessionmaker()() as session:
                    job_states.cancel(session, job_id)
                seen["after"] = last_step()  # the last step finished when the cancel was committed, or later
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def progress_every_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(progress_callback, "PROGRESS_EVERY_SECONDS", 0.0)
    yield


@pytest.mark.slow
@pytest.mark.usefixtures("progress_every_step")
def test_cancel_stops_within_a_step_with_a_checkpoint_and_a_new_attempt_resumes(
    store: Settings, tiny_model: Path
) -> None:
    file_id = add_file(store)
    job_id = add_job(str(tiny_model), training_file=file_id, max_steps=400, save_every_steps=1000, **FAST)
    seen: dict[str, Any] = {}
    thread = cancel_after_first_progress(job_id, seen)
    fine_tune.run_fine_tune(job_id, store)
    thread.join(timeout=5)

    job = job_row(job_id)
    assert job.status == "cancelled"
    result = job.result or {}
    stopped = result["step"]
    # It stops at the end of the step in flight when the cancel was committed (or of the next one, when
    # that step's check ran just before the commit).
    assert seen["before"] <= stopped <= seen["after"] + 2
    assert result["checkpoint"]["step"] == stopped
    (checkpoint,) = checkpoints(job_id)
    assert checkpoint.step == stopped and checkpoint.metrics["trained_tokens"] == result["trained_tokens"]
    assert checkpoint.path == f"jobs/{job_id}/attempt-1/checkpoints/checkpoint-{stopped}"
    assert {"adapter_model.safetensors", TRAINER_STATE} <= sealed_files(store, checkpoint.path, CHECKPOINT_SEAL)
    assert any("cancelled" in e.message for e in events(job_id))

    # A later attempt (as after a lost worker: the reaper requeues the job) resumes from that checkpoint.
    with get_sessionmaker()() as session:
        params = dict(job.params)
        params["hyperparameters"] = {**params["hyperparameters"], "max_steps": stopped + 3}
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="queued", cancel_requested=False, params=params, result=None, finished_at=None)
        )
        session.commit()
    fine_tune.run_fine_tune(job_id, store)
    job = job_row(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2
    assert any(e.message == f"Resuming from the checkpoint at step {stopped}." for e in events(job_id))
    second = [e.data for e in events(job_id, "metrics") if e.attempt == 2 and e.data and "train_loss" in e.data]
    assert [d["step"] for d in second] == [stopped + 1, stopped + 2, stopped + 3]
    assert (job.result or {})["trained_tokens"] > result["trained_tokens"]
    # Attempt 2 read attempt 1's checkpoint but wrote only into its own folders.
    assert (job.result or {})["adapter_path"] == f"adapters/{job_id}/attempt-2"
    assert not ArtifactStore.from_settings(store).exists(artifacts.adapter_key(job_id, 1))
    assert TRAINER_STATE in sealed_files(store, checkpoint.path, CHECKPOINT_SEAL)


def set_pause_requested(job_id: str) -> None:
    """A pause asked for before any worker claimed the job (as if it came during model loading): the worker
    pauses after its first step."""
    with get_sessionmaker()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(pause_requested=True))
        session.commit()


@pytest.mark.slow
def test_pause_frees_the_worker_and_resume_continues_as_if_never_paused(
    store: Settings, tiny_model: Path, tmp_path: Path
) -> None:
    file_id = add_file(store)
    hyper = {**FAST, "max_steps": 6, "save_every_steps": 1000, "quantization": "none"}
    straight = add_job(str(tiny_model), training_file=file_id, **hyper)
    fine_tune.run_fine_tune(straight, store)
    paused = add_job(str(tiny_model), training_file=file_id, **hyper)
    set_pause_requested(paused)
    fine_tune.run_fine_tune(paused, store)

    job = job_row(paused)
    assert job.status == "paused" and not job.pause_requested, job.error
    assert job.finished_at is None and job.lease_expires_at is None and job.worker is None
    assert [c.step for c in checkpoints(paused)] == [1] == [(job.result or {})["checkpoint"]["step"]]
    assert any(e.message == "Fine-tuning paused at step 1." for e in events(paused))
    with get_sessionmaker()() as session:
        resumed = job_states.resume(session, paused)
        assert resumed is not None and resumed.status == "queued" and resumed.max_attempts == 4
    fine_tune.run_fine_tune(paused, store)

    job, reference = job_row(paused), job_row(straight)
    assert job.status == "succeeded" and job.attempt == 2, job.error
    assert any(e.message == "Resuming from the checkpoint at step 1." for e in events(paused))
    result, expected = job.result or {}, reference.result or {}
    assert result["trained_tokens"] == expected["trained_tokens"]  # the data position carried over
    # Optimizer, scheduler and RNG state carried over too: the weights are those of the run never paused.
    ours = load_file(fetched(store, result["adapter_path"], ADAPTER_SEAL, tmp_path) / "adapter_model.safetensors")
    theirs = load_file(fetched(store, expected["adapter_path"], ADAPTER_SEAL, tmp_path) / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_pause_and_resume_move_a_job_only_between_the_states_they_name(store: Settings) -> None:
    job_id = add_job("some-base")
    with get_sessionmaker()() as session:
        paused = job_states.pause(session, job_id)
        assert paused is not None and paused.status == "paused"  # a queued job pauses at once
        assert job_states.pause(session, job_id).status == "paused"  # type: ignore[union-attr]
        resumed = job_states.resume(session, job_id)
        assert resumed is not None and resumed.status == "queued" and resumed.max_attempts == 3  # no attempt used
        assert job_states.resume(session, job_id).status == "queued"  # type: ignore[union-attr]
        claim = job_states.claim(session, job_id, worker="w", lease_seconds=60)
        assert claim is not None and job_states.stop_request(session, claim) is None
        running = job_states.pause(session, job_id)
        assert running is not None and running.status == "running" and running.pause_requested
        assert job_states.stop_request(session, claim) == "pause"
        assert job_states.finish_paused(session, claim, FineTuneResult(step=1))
        assert job_states.cancel(session, job_id).status == "cancelled"  # type: ignore[union-attr]
        assert job_states.resume(session, job_id).status == "cancelled"  # type: ignore[union-attr]


def test_resume_takes_the_newest_sealed_checkpoint_of_any_attempt(tmp_path: Path) -> None:
    stored = ArtifactStore((tmp_path / "store").as_uri(), {"auto_mkdir": True})
    local = tmp_path / "local"
    local.mkdir()
    (local / TRAINER_STATE).write_text("{}")

    def checkpoint(attempt: int, step: int, *, sealed: bool = True) -> str:
        key = artifacts.checkpoint_key("ftjob-1", attempt, step)
        if sealed:
            stored.put_sealed(local, key, CHECKPOINT_SEAL)
        else:  # the host died while copying it: files, no seal
            stored.put_file(local / TRAINER_STATE, f"{key}/{TRAINER_STATE}")
        return key

    assert last_sealed_checkpoint(stored, "ftjob-1") is None
    checkpoint(1, 4)
    newest = checkpoint(1, 8)
    checkpoint(2, 12, sealed=False)
    checkpoint(3, 6)
    checkpoint(1, 40)
    stored.unseal(artifacts.checkpoint_key("ftjob-1", 1, 40), CHECKPOINT_SEAL)  # rotated out
    assert last_sealed_checkpoint(stored, "ftjob-1") == newest


@pytest.mark.slow
def test_listed_checkpoints_are_the_ones_left_on_disk(store: Settings, tiny_model: Path) -> None:
    file_id = add_file(store)
    job_id = add_job(str(tiny_model), training_file=file_id, max_steps=6, save_every_steps=2, **FAST)

    fine_tune.run_fine_tune(job_id, store)

    assert job_row(job_id).status == "succeeded", job_row(job_id).error
    recorded = checkpoints(job_id)
    assert [c.step for c in recorded] == [4, 6]  # save_total_limit 2 deleted checkpoint-2; so was its row
    stored = ArtifactStore.from_settings(store)
    assert stored.sealed(artifacts.checkpoint_pattern(job_id), CHECKPOINT_SEAL) == [row.path for row in recorded]
    assert not stored.exists(artifacts.checkpoint_key(job_id, 1, 2))  # removed from the store, not only unsealed


class FakeAdapter:
    """Stands in for the trained PeftModel: saving writes one weights file that names its attempt."""

    def __init__(self, who: str) -> None:
        self.who = who

    def save_pretrained(self, folder: Path, safe_serialization: bool) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text(self.who)


class FakeTokenizer:
    """Stands in for the tokenizer the adapter folder and its archive carry: saving writes one config file."""

    eos_token = "<e>"
    chat_template: str | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"chat_template": self.chat_template}))


def test_a_stale_attempt_never_writes_into_the_adapter_folder_of_the_attempt_that_succeeded(
    store: Settings, tmp_path: Path
) -> None:
    job_id = add_job("base", training_file="file-x")
    hp = ResolvedHyperparameters.model_validate(job_row(job_id).params["hyperparameters"])
    loaded: Any = SimpleNamespace(
        model=SimpleNamespace(config=SimpleNamespace(_commit_hash=None)), tokenizer=FakeTokenizer()
    )
    data: Any = SimpleNamespace(source={"train": {"sha256": "x"}})

    def succeed(session: Any, claim: job_states.Claim, who: str) -> None:
        adapter = adapter_publishing.TrainedAdapter(FakeAdapter(who), loaded, data, hp, 7, {"trained_tokens": 1})
        adapter_publishing.publish_adapter(session, claim, store, adapter, tmp_path / who.replace(" ", "-") / "adapter")

    with get_sessionmaker()() as session:
        stale = job_states.claim(session, job_id, worker="a", lease_seconds=60)
        assert stale is not None
        session.execute(update(Job).where(Job.id == job_id).values(status="queued"))  # the reaper requeued it
        session.commit()
        current = job_states.claim(session, job_id, worker="b", lease_seconds=60)
        assert current is not None and current.attempt == 2
        succeed(session, current, "attempt 2")
        with pytest.raises(ClaimLost):
            succeed(session, stale, "attempt 1")  # reaches save_adapter after attempt 2 succeeded

    result = job_row(job_id).result or {}
    assert result["adapter_path"] == f"adapters/{job_id}/attempt-2"
    with get_sessionmaker()() as session:
        row = session.get(FineTunedModel, result["fine_tuned_model"])
        assert row is not None and row.path == result["adapter_path"]
        folder = fetched(store, row.path, ADAPTER_SEAL, tmp_path / "fetched")
        assert (folder / "adapter_model.safetensors").read_text() == "attempt 2"
        assert ArtifactStore.from_settings(store).read_seal(row.path, ADAPTER_SEAL) == row.manifest
    assert not ArtifactStore.from_settings(store).exists(artifacts.adapter_key(job_id, 1))  # the stale one cleaned up


# ----------------------------------------------------------------------------------------------------------
# Failures and no-ops
# ----------------------------------------------------------------------------------------------------------


def test_hub_dataset_without_a_reachable_hub_fails_with_dataset_unavailable(
    store: Settings, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dataset = {"name": "tatsu-lab/alpaca", "split": "train", "sample_size": 200}
    job_id = add_job(str(tiny_model), dataset=dataset)
    fine_tune.run_fine_tune(job_id, store)

    job = job_row(job_id)
    assert job.status == "failed"
    assert job.error is not None and job.error["code"] == "dataset_unavailable"
    message = job.error["message"]
    assert "hub is unreachable" in message.lower() and "tatsu-lab/alpaca" in message
    assert "\n" not in message and "Traceback" not in message
    assert events(job_id)[-1].message == message


@pytest.mark.parametrize("where", ["store", "relative"])
def test_a_queued_job_naming_a_folder_as_its_dataset_fails_without_reading_it(
    store: Settings, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Jobs queued before the gateway checked dataset.name (or under other settings) are stopped by the worker.
    other_tenants_file = add_file(store)
    stored = ArtifactStore.from_settings(store)
    assert stored.exists(artifacts.file_key(other_tenants_file))
    uploads = Path(stored.root) / "files"  # the file:// store's folder of every tenant's uploads
    if where == "store":
        name = str(uploads)  # every tenant's uploads, by absolute path
    else:
        (tmp_path / "tatsu-lab" / "alpaca").mkdir(parents=True)  # an offered id that is also a folder here
        (tmp_path / "tatsu-lab" / "alpaca" / "train.jsonl").write_bytes(SAMPLE.read_bytes())
        monkeypatch.chdir(tmp_path)
        name = "tatsu-lab/alpaca"
    job_id = add_job(str(tiny_model), dataset={"name": name, "split": "train", "sample_size": None})
    fine_tune.run_fine_tune(job_id, store)
    job = job_row(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "dataset_unavailable"
    assert name in job.error["message"] and not any("Loaded" in e.message for e in events(job_id))


@pytest.mark.parametrize(
    ("raised", "told"),
    [
        (FileNotFoundError("Couldn't find any data file at /srv/llmq/artifacts/files."), "FileNotFoundError"),
        (ValueError("Unknown split \"valid\". Should be one of ['train']."), "the dataset has no split 'valid'"),
    ],
)
def test_loader_errors_reach_the_job_naming_the_dataset_never_worker_paths(
    store: Settings, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, told: str
) -> None:
    import datasets

    def load_dataset(*_args: Any, **_kwargs: Any) -> Any:
        raise raised  # what datasets raises for these, path included

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    job_id = add_job(str(tiny_model), dataset={"name": "yahma/alpaca-cleaned", "split": "valid", "sample_size": None})
    fine_tune.run_fine_tune(job_id, store)
    message = job_row(job_id).error["message"]  # type: ignore[index]
    assert message == f"could not load dataset 'yahma/alpaca-cleaned' (split 'valid'): {told}"
    assert "/srv" not in message


def test_missing_training_file_fails_with_dataset_unavailable(store: Settings, tiny_model: Path) -> None:
    job_id = add_job(str(tiny_model), training_file="file-doesnotexist")
    fine_tune.run_fine_tune(job_id, store)
    job = job_row(job_id)
    assert job.status == "failed" and job.error == {
        "code": "dataset_unavailable",
        "message": "file file-doesnotexist does not exist",
    }


def test_unloadable_base_model_fails_with_model_load_failed(store: Settings, tmp_path: Path) -> None:
    job_id = add_job(str(tmp_path / "no-such-model"), training_file=add_file(store))
    fine_tune.run_fine_tune(job_id, store)
    job = job_row(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "model_load_failed"
    assert "no-such-model" in job.error["message"] and "\n" not in job.error["message"]


def test_message_for_a_job_that_is_not_queued_does_nothing(store: Settings, tiny_model: Path) -> None:
    job_id = add_job(str(tiny_model), training_file="file-x")
    with get_sessionmaker()() as session:
        job_states.cancel(session, job_id)
    before = job_row(job_id)
    fine_tune.run_fine_tune(job_id, store)
    after = job_row(job_id)
    assert (after.status, after.attempt, after.updated_at) == ("cancelled", 0, before.updated_at)
    assert events(job_id) == []


def test_fine_tuned_model_id_names_base_suffix_and_job() -> None:
    from shared.model_ids import CheckpointRef, checkpoint_model_id, fine_tuned_model_id, job_of, parse_checkpoint_id

    assert fine_tuned_model_id("openai-community/gpt2", None, "ftjob-1") == "ft:gpt2:llmq:ftjob-1"
    assert fine_tuned_model_id("/models/tiny/", "mine", "ftjob-2") == "ft:tiny:mine:ftjob-2"
    checkpoint = checkpoint_model_id("ft:tiny:mine:ftjob-2", 30)
    assert checkpoint == "ft:tiny:mine:ftjob-2:ckpt-step-30"
    assert parse_checkpoint_id(checkpoint) == CheckpointRef("ft:tiny:mine:ftjob-2", "ftjob-2", 30)
    assert parse_checkpoint_id("ft:tiny:mine:ftjob-2") is None and parse_checkpoint_id("ftjob-2:ckpt-step-3") is None
    assert job_of(checkpoint) == job_of("ft:tiny:mine:ftjob-2") == "ftjob-2" and job_of("tiny") is None


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_other_base_precisions_train_too(store: Settings, tiny_model: Path, quantization: str) -> None:
    file_id = add_file(store)
    job_id = add_job(str(tiny_model), training_file=file_id, max_steps=3, quantization=quantization, **FAST)
    fine_tune.run_fine_tune(job_id, store)
    job = job_row(job_id)
    assert job.status == "succeeded", job.error
    metrics = (job.result or {})["metrics"]
    assert metrics["steps"] == 3 and metrics["trained_tokens"] > 0
    assert metrics["val_loss"] < metrics["base_val_loss"]


def test_sample_generations_are_bounded_optional_and_never_fail_the_job(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.sample_generations import sample_generations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lora = LoraConfig(r=4, target_modules=["c_attn"], lora_alpha=64, fan_in_fan_out=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)  # an adapter that changes what the model says
    new_tokens: list[int] = []
    generate = model.generate

    def counted(**kwargs: Any) -> torch.Tensor:
        out = generate(**kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counted
    records = read_jsonl(DATA / "alpaca_sample_val.jsonl", "v")
    kwargs: dict[str, Any] = {"max_tokens": 6, "max_prompt_tokens": 256}
    samples = sample_generations(model, tokenizer, records, ALPACA_CHAT_TEMPLATE, count=2, **kwargs)
    assert len(samples) == 2 and samples[0].reference == records[0]["output"]
    assert all(s.base is not None for s in samples)
    assert len(new_tokens) == 4 and max(new_tokens) <= 6  # 2 prompts x (fine-tuned, base), bounded
    assert any(s.fine_tuned != s.base for s in samples)
    again = sample_generations(model, tokenizer, records, ALPACA_CHAT_TEMPLATE, count=2, **kwargs)
    assert [s.fine_tuned for s in again] == [s.fine_tuned for s in samples]  # the adapter is on again afterwards
    assert sample_generations(model, tokenizer, records, ALPACA_CHAT_TEMPLATE, count=0, **kwargs) == []
    assert sample_generations(model, tokenizer, [], ALPACA_CHAT_TEMPLATE, count=3, **kwargs) == []
    broken = SimpleNamespace(generate=None, parameters=lambda: iter([torch.zeros(1)]), training=False)
    assert sample_generations(broken, tokenizer, records, ALPACA_CHAT_TEMPLATE, count=1, **kwargs) == []
