"""A succeeded fine-tune's result files: the adapter archive and the per-step metrics CSV, stored and described.

Both go into the attempt's own results folder of the artifact store (artifacts.results_key) and become file
rows of the job's tenant with purpose `fine-tune-results`, so `GET /v1/files/{id}/content` (and
`llmq download`) streams them like an upload. The rows are committed with the job's success (the caller adds
them to job_states.succeed), and an attempt that lost its claim removes the folder.

    <job>-adapter.tar.gz  adapter_model.safetensors, adapter_config.json, manifest.json, tokenizer files
    <job>-metrics.csv     step,train_loss,valid_loss,learning_rate,tokens (one row per logged step)
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared import artifacts
from shared.artifacts import ArtifactStore, sha256_of
from shared.models import File, new_id, utcnow

PURPOSE = "fine-tune-results"
METRICS_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens")


def metrics_rows(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per step the Trainer logged (training loss, evaluation loss or both), in step order.

    log_history is trainer.state.log_history: training entries carry loss, learning_rate and trained_tokens
    (CountingSFTTrainer.log), evaluation entries eval_loss; a resumed attempt's history starts with those of
    the attempts before it (restored from the checkpoint's trainer_state.json).
    """
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry or not ({"loss", "eval_loss"} & set(entry)):
            continue
        row = rows.setdefault(int(entry["step"]), dict.fromkeys(METRICS_COLUMNS) | {"step": int(entry["step"])})
        if "loss" in entry:
            row.update(train_loss=entry["loss"], learning_rate=entry.get("learning_rate"),
                       tokens=entry.get("trained_tokens"))  # fmt: skip
        if "eval_loss" in entry:
            row["valid_loss"] = entry["eval_loss"]
    return [rows[step] for step in sorted(rows)]


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_adapter_archive(adapter_dir: Path, manifest: Mapping[str, Any], tokenizer: Any, path: Path) -> None:
    """A tar.gz of the adapter folder, its manifest and the tokenizer's files (flat, no leading folder)."""
    extra = path.parent / "tokenizer"
    tokenizer.save_pretrained(str(extra))
    (extra / artifacts.ADAPTER_SEAL).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    with tarfile.open(path, "w:gz") as archive:
        for folder in (adapter_dir, extra):
            for file in sorted(p for p in folder.iterdir() if p.is_file()):
                archive.add(file, arcname=file.name)


def store_result_files(
    store: ArtifactStore,
    job_id: str,
    attempt: int,
    tenant: str,
    local: Path,
    *,
    adapter_dir: Path,
    manifest: Mapping[str, Any],
    tokenizer: Any,
    log_history: Sequence[Mapping[str, Any]],
) -> list[File]:
    """Writes both result files under the new local folder `local`, stores them, and returns their rows (not
    added to any session: the caller commits them with the job's success)."""
    local.mkdir(parents=True)
    archive, table = local / f"{job_id}-adapter.tar.gz", local / f"{job_id}-metrics.csv"
    write_adapter_archive(adapter_dir, manifest, tokenizer, archive)
    rows = metrics_rows(log_history)
    write_metrics_csv(rows, table)
    folder = artifacts.results_key(job_id, attempt)
    files = []
    for path, records in ((archive, 0), (table, len(rows))):
        key = f"{folder}/{path.name}"
        store.put_file(path, key)
        files.append(file_row(path, key, tenant, records))
    return files


def file_row(path: Path, key: str, tenant: str, records: int) -> File:
    """A new file row of the tenant (purpose fine-tune-results) for a local file stored under key."""
    return File(
        id=new_id("file"),
        tenant=tenant,
        filename=path.name,
        purpose=PURPOSE,
        bytes=path.stat().st_size,
        records=records,
        sha256=sha256_of(path),
        path=key,
        created_at=utcnow(),
    )
