"""Training files: upload (validated Alpaca records), list, read, delete."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from sqlalchemy import select

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, ApiError, FileNotFound, PayloadTooLarge, documented
from shared import artifacts
from shared.alpaca import BadRecord, Limits, read_records
from shared.models import File, new_id, utcnow
from shared.request_fields import plain_name
from shared.schemas import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)

CHUNK = 1 << 20


class InvalidFile(ApiError):
    status_code = 422
    code = "invalid_file"


@router.post("", response_model=FileObject, responses=BODY_ERRORS)
async def upload_file(
    file: UploadFile,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FileObject:
    """Stores an Alpaca file (JSONL or JSON array) once every record is valid; 422 names the first bad one."""
    if purpose != "fine-tune":
        raise InvalidFile("purpose must be 'fine-tune'")
    try:
        plain_name(file.filename or "")
    except ValueError as exc:
        raise InvalidFile(f"file: the file name {exc}") from None
    file_id = new_id("file")
    final = artifacts.resolve(settings, artifacts.file_path(file_id))
    upload = final.with_suffix(".upload")
    final.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with upload.open("wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(f"file larger than {settings.max_upload_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        limits = Limits(max_records=settings.max_records, max_field_chars=settings.max_field_chars)
        count = 0
        with final.with_suffix(".part").open("w", encoding="utf-8") as out:
            for record in read_records(upload, limits):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise BadRecord("file", "no records")
        os.replace(final.with_suffix(".part"), final)
    except BadRecord as exc:
        final.with_suffix(".part").unlink(missing_ok=True)
        raise InvalidFile(f"{file.filename or 'file'}: {exc}") from None
    except RecursionError:  # json.loads of arrays or objects nested thousands deep
        raise InvalidFile(f"{file.filename or 'file'}: JSON nested too deeply") from None
    finally:
        upload.unlink(missing_ok=True)
        final.with_suffix(".part").unlink(missing_ok=True)
    row = File(
        id=file_id,
        tenant=tenant,
        filename=(file.filename or "upload.jsonl")[:255],
        purpose=purpose,
        bytes=size,
        records=count,
        sha256=digest.hexdigest(),
        path=artifacts.file_path(file_id),
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return views.file_object(row)


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
