"""Training data for a fine-tune: Alpaca records from an uploaded file or a hub dataset, split and formatted.

A record is {"instruction", "input", "output"}, checked by shared.alpaca as the gateway checked the upload. An
example is what the trainer sees: the Stanford prompt and the completion it must learn, `RESPONSE_PREFIX +
output` (the trainer appends EOS and trains it too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import JsonValue, ValidationError
from sqlalchemy.orm import Session

from shared.alpaca import (
    FIELDS,
    PROMPT_COMPLETION,
    UNCAPPED,
    BadRecord,
    Record,
    check_record,
    is_prompt_completion,
    jsonl_records,
)
from shared.artifacts import ArtifactStore
from shared.fine_tuning import HubDataset, ResolvedHyperparameters
from shared.job_data import FineTuneParams
from shared.models import File
from shared.prompts import alpaca_prompt
from shared.settings import Settings

log = logging.getLogger(__name__)

Source = dict[str, JsonValue]  # where training data came from, as the manifest records it

# The prompt ends with "### Response:". A space before the response makes its first word the same
# space-prefixed BPE token it is everywhere else in GPT-2 text, keeps the tokenized prompt an exact prefix of
# prompt + completion (so the prompt/completion boundary is exact), and costs no extra token; a newline costs
# one token per example and no separator makes the first word an odd, unprefixed token. Generated text
# therefore starts with this space; the manifest records it so serving can strip it.
RESPONSE_PREFIX = " "


class DatasetUnavailable(Exception):
    """The training or validation data cannot be loaded (hub unreachable, file missing, wrong shape)."""


@dataclass(frozen=True)
class TrainingData:
    """The records a job trains and validates on, and where they came from (for the manifest)."""

    train: list[Record]
    validation: list[Record]
    source: Source = field(default_factory=dict)


def completion(output: str) -> str:
    """The completion the model learns for an output (EOS is appended by the trainer)."""
    return output if output[:1].isspace() else RESPONSE_PREFIX + output


def to_examples(records: Sequence[Record]) -> list[dict[str, str]]:
    """Prompt/completion pairs, the shape TRL trains with completion-only loss: Alpaca records in the Stanford
    template, prompt/completion records as given."""
    return [
        {"prompt": r["prompt"], "completion": r["completion"]}
        if is_prompt_completion(r)
        else {"prompt": alpaca_prompt(r["instruction"], r.get("input", "")), "completion": completion(r["output"])}
        for r in records
    ]


def records_sha256(records: Sequence[Record]) -> str:
    """sha256 of records as canonical JSON lines (sorted keys), for data that came without a file hash."""
    digest = hashlib.sha256()
    for record in records:
        keys = PROMPT_COMPLETION if is_prompt_completion(record) else FIELDS
        digest.update(json.dumps({k: record[k] for k in keys}, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def read_jsonl(path: Path, name: str) -> list[Record]:
    """The records of a local JSONL file of Alpaca records; DatasetUnavailable when missing or malformed."""
    try:
        with path.open("rb") as stream:
            return parse_jsonl(stream, name)
    except OSError as exc:
        raise DatasetUnavailable(f"file {name} cannot be read: {exc.strerror or exc}") from exc


def read_stored_jsonl(store: ArtifactStore, key: str, name: str) -> list[Record]:
    """The records of a JSONL file in the artifact store, streamed line by line."""
    try:
        with store.open(key) as raw:
            return parse_jsonl(raw, name)
    except OSError as exc:  # ArtifactMissing, or the store not answering
        raise DatasetUnavailable(f"file {name} cannot be read from the artifact store: {exc}") from exc


def parse_jsonl(stream: IO[bytes], name: str) -> list[Record]:
    """The records of JSONL bytes (as the gateway stores uploads), checked as the upload was (shared.alpaca,
    uncapped: the caps were the upload's); DatasetUnavailable naming the first bad line, or when there is none."""
    try:
        records = list(jsonl_records(stream, UNCAPPED))
    except BadRecord as exc:
        raise DatasetUnavailable(f"file {name}, {exc}") from exc
    if not records:
        raise DatasetUnavailable(f"file {name} holds no records")
    return records


def _hub_record(row: dict[str, object], where: str) -> Record:
    """A hub dataset row's record: its instruction, input and output (other columns, such as tatsu-lab/alpaca's
    `text`, are not part of it)."""
    try:
        return check_record({k: row[k] for k in FIELDS if k in row}, where, UNCAPPED)
    except BadRecord as exc:
        raise DatasetUnavailable(str(exc)) from exc


def load_file(session: Session, settings: Settings, file_id: str) -> tuple[list[Record], Source]:
    """An uploaded file's records and its manifest entry (id, sha256)."""
    row = session.get(File, file_id)
    key, sha256 = (row.path, row.sha256) if row is not None else ("", "")
    session.rollback()  # a read; end the transaction so SQLite writers are not held up
    if row is None:
        raise DatasetUnavailable(f"file {file_id} does not exist")
    records = read_stored_jsonl(ArtifactStore.from_settings(settings), key, file_id)
    return records, {"type": "file", "file_id": file_id, "sha256": sha256, "records": len(records)}


def load_hub(spec: HubDataset, seed: int, settings: Settings) -> tuple[list[Record], Source]:
    """A hub dataset's records (a seeded sample when sample_size is set) and its manifest entry.

    Only an offered hub id that names nothing on this machine reaches the loader (the gateway checked the same;
    a job queued before that check, or under other settings, is stopped here). A loader error reaches the job as
    a message naming the dataset and the kind of error, never the loader's own text, which shows this
    machine's paths; that goes to the worker's log.
    """
    if spec.name not in settings.allowed_datasets or Path(spec.name).exists():
        raise DatasetUnavailable(f"dataset {spec.name!r} is not offered by this service")
    import datasets  # costs about a second to import; only hub datasets need it

    try:
        loaded = datasets.load_dataset(spec.name, split=spec.split)
    except (ConnectionError, TimeoutError) as exc:
        # datasets raises ConnectionError("Couldn't reach ... on the Hub (...)") offline and when the hub is down.
        raise DatasetUnavailable(
            f"the Hugging Face hub is unreachable: could not load dataset {spec.name!r} (split {spec.split!r}); "
            "upload a training file instead"
        ) from exc
    except Exception as exc:  # DatasetNotFoundError, a bad split name, ...
        log.warning("loading dataset %r (split %r) failed", spec.name, spec.split, exc_info=True)
        raise DatasetUnavailable(_load_error(spec, exc)) from exc
    if not isinstance(loaded, datasets.Dataset):
        raise DatasetUnavailable(f"dataset {spec.name!r} split {spec.split!r} is not a single split")
    missing = [c for c in ("instruction", "output") if c not in loaded.column_names]
    if missing:
        raise DatasetUnavailable(f"dataset {spec.name!r} has no column {', '.join(missing)}")
    if spec.sample_size is not None and spec.sample_size < len(loaded):
        loaded = loaded.shuffle(seed=seed).select(range(spec.sample_size))
    records = [_hub_record(row, f"dataset {spec.name!r} row {i}") for i, row in enumerate(loaded)]
    if not records:
        raise DatasetUnavailable(f"dataset {spec.name!r} split {spec.split!r} is empty")
    source: Source = {
        "type": "hub",
        "name": spec.name,
        "split": spec.split,
        "sample_size": spec.sample_size,
        "sha256": records_sha256(records),
        "records": len(records),
    }
    return records, source


def _load_error(spec: HubDataset, exc: Exception) -> str:
    """What went wrong loading a hub dataset, in words that name the dataset and nothing of this machine."""
    where = f"dataset {spec.name!r} (split {spec.split!r})"
    if "Unknown split" in str(exc):
        return f"could not load {where}: the dataset has no split {spec.split!r}"
    if type(exc).__name__ == "DatasetNotFoundError":
        return f"could not load {where}: no such dataset on the hub"
    return f"could not load {where}: {type(exc).__name__}"


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded share of the records held out; none when fraction is 0 or too few."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held_out = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in held_out]
    validation = [records[i] for i in sorted(held_out)]
    return train, validation


def _hub_dataset(stored: dict[str, JsonValue]) -> HubDataset:
    try:
        return HubDataset.model_validate(stored)
    except ValidationError:
        raise DatasetUnavailable(f"dataset {stored.get('name')!r} is not a hub dataset id (owner/name)") from None


def load_training_data(session: Session, settings: Settings, params: FineTuneParams) -> TrainingData:
    """The job's training and validation records, from its files or its hub dataset."""
    seed = params.seed
    if params.training_file:
        records, source = load_file(session, settings, params.training_file)
    elif params.dataset:
        records, source = load_hub(_hub_dataset(params.dataset), seed, settings)
    else:
        raise DatasetUnavailable("the job names neither a training file nor a dataset")

    if params.validation_file:
        validation, val_source = load_file(session, settings, params.validation_file)
        train = records
        sources: Source = {"train": source, "validation": val_source}
    else:
        fraction = ResolvedHyperparameters.model_validate(params.hyperparameters).validation_split
        train, validation = split_validation(records, fraction, seed)
        sources = {"train": source, "validation": {"type": "split", "fraction": fraction, "seed": seed}}
    sources["train_records"] = len(train)
    sources["validation_records"] = len(validation)
    return TrainingData(train=train, validation=validation, source=sources)
