"""Exporting a fine-tune as a standalone model: its adapter merged into the unquantized base, as a Hugging Face
model folder in a tar archive that the tenant downloads like any file.

run_export reads top to bottom: claim -> fetch the adapter (the fine-tuned model's, or a checkpoint's) checked
against its seal -> load the base in float32 from its own weights (never the nf4 weights it was trained on)
-> peft merge_and_unload -> cast to the asked dtype -> save the folder (safetensors, config.json,
generation_config.json, tokenizer files with the chat template, README.md model card) -> tar -> store under
the attempt's own exports folder -> the file row (purpose fine-tune-results) and the job's success in one
guarded write. A crash anywhere leaves the job running until its lease expires; the reaper then queues it
again and the next attempt starts over (an attempt that lost its claim removes what it stored).

The merge runs in float32 and the result is cast once: a float16 export then holds the rounding of W + BA,
not the sum of two rounded float16 terms. The archive is an uncompressed tar: safetensors weights barely
compress, and gzip on gigabytes costs minutes for a few percent.
"""

from __future__ import annotations

import gc
import json
import logging
import tarfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import artifacts, job_states
from shared.artifacts import CHECKPOINT_SEAL, ArtifactStore
from shared.db import get_sessionmaker
from shared.job_data import ErrorCode, ExportParams, ExportResult, FineTuneParams
from shared.job_states import Claim
from shared.model_ids import parse_checkpoint_id
from shared.models import Checkpoint, FineTunedModel, Job
from shared.notify import publish_finished
from shared.settings import Settings
from worker.fine_tune import scratch_folder
from worker.guarded_writes import ClaimLost, add_event, renew_lease
from worker.identity import worker_id
from worker.leases import lease_keeper
from worker.parent_models import ParentUnavailable, fetch_parent
from worker.result_files import file_row

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
# A checkpoint's tokenizer files (the Trainer saves its processing class there): fetched with its adapter.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja",
)  # fmt: skip


def run_export(job_id: str, settings: Settings) -> None:
    """Runs one export job to a terminal state; a job that is not queued is left alone."""
    with get_sessionmaker()() as session:
        claim = job_states.claim(session, job_id, worker=worker_id(), lease_seconds=settings.lease_seconds)
        if claim is None:
            log.info("export %s is not queued; nothing to do", job_id)
            return
        log.info("export %s claimed (attempt %d)", job_id, claim.attempt)
        try:
            with lease_keeper(settings.lease_seconds).holding([claim]):
                _export(session, claim, settings)
        except ClaimLost:
            log.warning("export %s: attempt %d lost its claim; stopped", job_id, claim.attempt)
            return
        except Exception as exc:
            log.exception("export %s failed", job_id)
            session.rollback()
            code = exc.code if isinstance(exc, ParentUnavailable) else ErrorCode.EXPORT_FAILED
            message = " ".join(f"export failed: {type(exc).__name__}: {exc}".split())[:1000]
            job_states.add_event(session, claim, message, level="error")
            job_states.fail(session, claim, code, message)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    publish_finished([job_id])


def _export(session: Session, claim: Claim, settings: Settings) -> None:
    """Merges, saves, packs and stores the claimed export, then records its file and success."""
    job: Job = claim.job
    started = time.monotonic()
    params = ExportParams.model_validate(job.params)
    store = ArtifactStore.from_settings(settings)
    add_event(session, claim, f"Export of {job.model} started (attempt {claim.attempt}, {params.dtype}).")
    with scratch_folder(settings, job.id) as scratch:
        parent = fetch_parent(session, store, job, job.model, scratch / "adapter")
        tokenizer_dir = _checkpoint_tokenizer(session, store, job.model, scratch / "tokenizer") or parent.folder
        folder = scratch / "model"
        merge_adapter(job.base_model, settings.base_model_revision, parent.folder, tokenizer_dir, params.dtype, folder)
        renew_lease(session, claim, settings)
        card = ModelCard(job.model, params.dtype, parent.lineage, _trained_with(session, job.model))
        (folder / "README.md").write_text(card.render())
        archive = scratch / f"{_file_stem(job.model)}-{params.dtype}.tar"
        pack(folder, archive)
        key = f"{artifacts.export_key(job.id, claim.attempt)}/{archive.name}"
        store.put_file(archive, key)
        row = file_row(archive, key, job.tenant, records=0)
        result = ExportResult(
            file_id=row.id, bytes=row.bytes, sha256=row.sha256, seconds=round(time.monotonic() - started, 3)
        )
    try:
        add_event(session, claim, f"Exported {job.model} as {row.filename} ({row.bytes} bytes).",
                  data={"file_id": row.id, "seconds": result.seconds})  # fmt: skip
        if not job_states.succeed(session, claim, result, add=[row]):
            raise ClaimLost(claim.job_id)
    except ClaimLost:
        store.delete(artifacts.export_key(job.id, claim.attempt))  # this attempt's own folder
        raise
    log.info("export %s succeeded: %s (%.1f s)", job.id, row.id, result.seconds or 0.0)


def merge_adapter(
    base_model: str, revision: str, adapter_dir: Path, tokenizer_dir: Path, dtype: str, into: Path
) -> None:
    """Writes into `into` the base model with the adapter merged in, in dtype, as a Hugging Face folder that
    loads without peft: model.safetensors, config.json, generation_config.json and the tokenizer's files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(
        base_model, revision=revision, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    # Served prompts are padded on the left; a standalone model is most often run one prompt at a time.
    tokenizer.padding_side = "right"
    generation = merged.generation_config if merged.generation_config is not None else GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    merged.generation_config = generation
    merged.config.dtype = DTYPES[dtype]
    merged.save_pretrained(str(into), safe_serialization=True)
    generation.save_pretrained(str(into))
    tokenizer.save_pretrained(str(into))


def pack(folder: Path, archive: Path) -> None:
    """An uncompressed tar of the folder's files, flat (no leading folder): unpack it into a folder of your own."""
    with tarfile.open(archive, "w") as tar:
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(file, arcname=file.name)


def _file_stem(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model_id.removeprefix("ft:"))[:180]


def _checkpoint_tokenizer(session: Session, store: ArtifactStore, model_id: str, into: Path) -> Path | None:
    """A checkpoint's tokenizer files (with the chat template it trained with), fetched into `into`; None for a
    fine-tuned model (its adapter folder holds them) or a checkpoint stored without them."""
    ref = parse_checkpoint_id(model_id)
    if ref is None:
        return None
    key = session.scalars(
        select(Checkpoint.path).where(Checkpoint.job_id == ref.job_id, Checkpoint.step == ref.step)
    ).first()
    if key is None:
        return None
    listed = store.read_seal(key, CHECKPOINT_SEAL)["files"]
    files = {name: listed[name] for name in TOKENIZER_FILES if name in listed}
    if "tokenizer_config.json" not in files:
        return None
    store.get_sealed(key, files, into)
    return into


def _trained_with(session: Session, model_id: str) -> dict[str, Any]:
    """What the model card tells of the training: the fine-tuned model's manifest, or for a checkpoint the
    manifest of its job's model when there is one, else the fine-tune's own parameters and the checkpoint's
    metrics."""
    ref = parse_checkpoint_id(model_id)
    row = session.get(FineTunedModel, ref.model_id if ref is not None else model_id)
    job = session.get(Job, ref.job_id) if ref is not None else None
    facts: dict[str, Any] = {}
    if row is not None and isinstance(row.manifest, dict):
        facts = dict(row.manifest)
    elif job is not None:
        params = FineTuneParams.model_validate(job.params)
        facts = {"dataset": params.dataset or {"training_file": params.training_file},
                 "hyperparameters": params.hyperparameters, "seed": params.seed}  # fmt: skip
    if ref is not None:
        metrics = session.scalars(
            select(Checkpoint.metrics).where(Checkpoint.job_id == ref.job_id, Checkpoint.step == ref.step)
        ).first()
        facts["metrics"] = {"step": ref.step, **(metrics or {})}
    return facts


class ModelCard:
    """README.md of an exported model: where it came from, how it was trained, how to load it."""

    def __init__(self, model_id: str, dtype: str, lineage: list[str], trained: dict[str, Any]) -> None:
        self.model_id, self.dtype, self.lineage, self.trained = model_id, dtype, lineage, trained

    def render(self) -> str:
        """The card's Markdown, with a YAML header the Hub reads."""
        t = self.trained
        base = self.lineage[-1] if self.lineage else "?"
        chain = " <- ".join(f"`{m}`" for m in self.lineage)
        losses = {k: v for k, v in (t.get("metrics") or {}).items() if "loss" in k or k in ("steps", "step")}
        return "\n".join([
            "---",
            "library_name: transformers",
            f"base_model: {json.dumps(base)}",
            "tags: [llmq, lora, merged]",
            "---",
            "",
            f"# {self.model_id}",
            "",
            f"A standalone model exported by llmq {_llmq_version()}: the LoRA adapter of `{self.model_id}` merged "
            f"into its base model `{base}` (loaded unquantized), weights in {self.dtype}.",
            "",
            "## Lineage",
            "",
            f"{chain} (each fine-tune continued from the next; the last is the base model).",
            "",
            "## Training",
            "",
            f"- dataset: `{json.dumps(t.get('dataset'), sort_keys=True)}`",
            f"- hyperparameters: `{json.dumps(t.get('hyperparameters'), sort_keys=True)}`",
            f"- seed: {t.get('seed')}",
            f"- trained in: {t.get('quantization', 'nf4')} (QLoRA); exported unquantized",
            f"- final losses: `{json.dumps(losses, sort_keys=True)}`",
            f"- versions at training: `{json.dumps(t.get('versions'), sort_keys=True)}`",
            "",
            "## Use",
            "",
            "Prompts are written with the tokenizer's chat template (the Alpaca prompt unless the fine-tune used "
            "another): `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'messages = [{"role": "user", "content": "Give three tips for staying healthy."}]',
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:]))",
            "```",
            "",
        ])  # fmt: skip


def _llmq_version() -> str:
    try:
        return version("llmq")
    except PackageNotFoundError:
        return "(unknown version)"
