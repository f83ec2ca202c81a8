"""An uploaded training file into the artifact store: spooled, validated, then stored; nothing left on failure.

The upload is copied in chunks to a local temporary file (hashed and size-checked as it goes), its records are
validated and rewritten as normalized JSONL, and only that validated file is streamed into the store. No step
holds the whole file in memory. The caller runs this in a worker thread (validation takes seconds for a big
file; the event loop goes on meanwhile). Any failure (too large, a bad record, the store refusing) removes
the local spool and whatever the store kept; the caller deletes the stored key when its row does not commit.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.errors import PayloadTooLarge
from shared import artifacts
from shared.alpaca import BadRecord, Limits, read_records
from shared.artifacts import ArtifactStore
from shared.chat_records import stored_record
from shared.settings import Settings

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredUpload:
    """What the file row records of a stored upload."""

    key: str
    bytes: int  # of the upload as sent
    sha256: str  # of the upload as sent
    records: int


def store_upload(source: BinaryIO, settings: Settings, file_id: str) -> StoredUpload:
    """Validates an upload and stores its records under the file's key.

    PayloadTooLarge past max_upload_bytes; BadRecord (or RecursionError, for JSON nested thousands deep)
    naming the first bad record. Nothing is stored unless it returns.
    """
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=settings.scratch_dir) as folder:
        raw, normalized = Path(folder) / "raw", Path(folder) / "records.jsonl"
        size, digest = _copy(source, raw, settings.max_upload_bytes)
        limits = Limits(max_records=settings.max_records, max_field_chars=settings.max_field_chars)
        count = _normalize(raw, normalized, limits)
        key = artifacts.file_key(file_id)
        store = ArtifactStore.from_settings(settings)
        try:
            store.put_file(normalized, key)
        except BaseException:
            store.delete(key)  # a part the store kept of an interrupted copy
            raise
    return StoredUpload(key=key, bytes=size, sha256=digest, records=count)


def _copy(source: BinaryIO, target: Path, max_bytes: int) -> tuple[int, str]:
    """Copies the uploaded bytes to target; (size, sha256). 413 past max_bytes."""
    digest, size = hashlib.sha256(), 0
    source.seek(0)
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"file larger than {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def _normalize(raw: Path, normalized: Path, limits: Limits) -> int:
    """Writes every record of raw as one JSON line into normalized; the count (BadRecord when there is none)."""
    count = 0
    with normalized.open("w", encoding="utf-8") as out:
        for record in read_records(raw, limits):
            out.write(json.dumps(stored_record(record), ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise BadRecord("file", "no records")
    return count
