"""Training files: upload (validated Alpaca records), list, read, delete."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Form, UploadFile
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, ApiError, FileNotFound, PayloadTooLarge, documented
from shared import artifacts
from shared.alpaca import BadRecord, Limits, read_records
from shared.db import get_sessionmaker
from shared.models import File, new_id, utcnow
from shared.request_fields import plain_name
from shared.schemas import FileDeleted, FileList, FileObject
from shared.settings import Settings

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)

CHUNK = 1 << 20


class InvalidFile(ApiError):
    status_code = 422
    code = "invalid_file"


@router.post("", response_model=FileObject, responses=BODY_ERRORS)
async def upload_file(
    file: UploadFile,
    settings: SettingsDep,
    tenant: TenantDep,
    purpose: Annotated[Literal["fine-tune"], Form()] = "fine-tune",
) -> FileObject:
    """Stores an Alpaca file (JSONL or JSON array) once every record is valid; 422 names the first bad one."""
    try:
        plain_name(file.filename or "")
    except ValueError as exc:
        raise InvalidFile(f"file: the file name {exc}") from None
    # Reading, validating and storing take seconds for a big file: in a worker thread, so that the event loop
    # goes on answering every other request meanwhile.
    row = await run_in_threadpool(_store, file, settings, tenant, purpose)
    return views.file_object(row)


def _store(file: UploadFile, settings: Settings, tenant: str, purpose: str) -> File:
    """Validates the upload, stores its records and then its row; 413 or 422 otherwise.

    Whatever goes wrong (a bad record, too many bytes, the database refusing the row), nothing is left
    behind: neither a file nor a row.
    """
    file_id = new_id("file")
    final = artifacts.resolve(settings, artifacts.file_path(file_id))
    upload, part = final.with_suffix(".upload"), final.with_suffix(".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    name = file.filename or "file"
    try:
        size, digest = _copy(file.file, upload, settings.max_upload_bytes)
        limits = Limits(max_records=settings.max_records, max_field_chars=settings.max_field_chars)
        count = 0
        with part.open("w", encoding="utf-8") as out:
            for record in read_records(upload, limits):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise BadRecord("file", "no records")
        os.replace(part, final)
        row = File(
            id=file_id,
            tenant=tenant,
            filename=(file.filename or "upload.jsonl")[:255],
            purpose=purpose,
            bytes=size,
            records=count,
            sha256=digest,
            path=artifacts.file_path(file_id),
            created_at=utcnow(),
        )
        with get_sessionmaker()() as session:
            session.add(row)
            session.commit()
        return row
    except BadRecord as exc:
        final.unlink(missing_ok=True)
        raise InvalidFile(f"{name}: {exc}") from None
    except RecursionError:  # json.loads of arrays or objects nested thousands deep
        final.unlink(missing_ok=True)
        raise InvalidFile(f"{name}: JSON nested too deeply") from None
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    finally:
        upload.unlink(missing_ok=True)
        part.unlink(missing_ok=True)


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


@router.get("", response_model=FileList)
def list_files(session: SessionDep, tenant: TenantDep) -> FileList:
    """Every file the tenant uploaded, newest first."""
    rows = session.scalars(
        select(File).where(File.tenant == tenant).order_by(File.created_at.desc(), File.id.desc())
    ).all()
    return FileList(data=views.readable(rows, views.file_object))


@router.get("/{file_id}", response_model=FileObject, responses=documented(404))
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    """One file's description."""
    row = owned.file(session, tenant, file_id)
    if row is None:
        raise FileNotFound(f"file {file_id!r} not found")
    return views.file_object(row)


@router.delete("/{file_id}", response_model=FileDeleted, responses=documented(404))
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> FileDeleted:
    """Deletes a file and its stored records (jobs that already used it keep their results)."""
    row = owned.file(session, tenant, file_id)
    if row is None:
        raise FileNotFound(f"file {file_id!r} not found")
    artifacts.resolve(settings, row.path).unlink(missing_ok=True)
    session.delete(row)
    session.commit()
    return FileDeleted(id=file_id, deleted=True)
