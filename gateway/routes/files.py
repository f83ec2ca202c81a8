"""Files: upload (validated Alpaca records), list, read, download the content, delete."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import select, tuple_
from starlette.concurrency import run_in_threadpool

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, ApiError, FileNotFound, documented
from gateway.uploads import store_batch_input, store_upload
from shared.alpaca import BadRecord
from shared.artifacts import ArtifactMissing, ArtifactStore
from shared.db import get_sessionmaker
from shared.models import File, new_id, utcnow
from shared.request_fields import plain_name
from shared.schemas import FileDeleted, FileList, FileObject
from shared.settings import Settings

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)


class InvalidFile(ApiError):
    status_code = 422
    code = "invalid_file"


@router.post("", response_model=FileObject, responses=BODY_ERRORS)
async def upload_file(
    file: UploadFile,
    settings: SettingsDep,
    tenant: TenantDep,
    purpose: Annotated[Literal["fine-tune", "batch"], Form()] = "fine-tune",
) -> FileObject:
    """Stores an Alpaca file (JSONL or JSON array) once every record is valid (422 names the first bad one); a
    batch's input file (purpose batch) as sent, its lines checked when a batch is created."""
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

    Whatever goes wrong (a bad record, too many bytes, the store or the database refusing), nothing is left
    behind: neither a file (in the store or in the local spool) nor a row.
    """
    file_id = new_id("file")
    name = file.filename or "file"
    try:
        store = store_batch_input if purpose == "batch" else store_upload
        stored = store(file.file, settings, file_id)
    except BadRecord as exc:
        raise InvalidFile(f"{name}: {exc}") from None
    except RecursionError:  # json.loads of arrays or objects nested thousands deep
        raise InvalidFile(f"{name}: JSON nested too deeply") from None
    row = File(
        id=file_id,
        tenant=tenant,
        filename=(file.filename or "upload.jsonl")[:255],
        purpose=purpose,
        bytes=stored.bytes,
        records=stored.records,
        sha256=stored.sha256,
        path=stored.key,
        created_at=utcnow(),
    )
    try:
        with get_sessionmaker()() as session:
            session.add(row)
            session.commit()
    except BaseException:
        ArtifactStore.from_settings(settings).delete(stored.key)  # no file without its row
        raise
    return row


# What a file is for: uploads (fine-tune, batch) and what llmq writes (a batch's output and error files, a
# fine-tune's results and exports).
FilePurpose = Literal["fine-tune", "batch", "batch_output", "fine-tune-results"]


@router.get("", response_model=FileList, responses=documented(404))
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: Annotated[FilePurpose | None, Query(description="Only the files of this purpose.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time; desc: newest first.")] = "desc",
    after: Annotated[str | None, Query(description="Id of the last file of the previous page.")] = None,
) -> FileList:
    """The tenant's files (of one purpose), newest first unless order=asc, a page at a time (OpenAI's query)."""
    newest_first = order == "desc"
    query = select(File).where(File.tenant == tenant)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        cursor = owned.file_or_404(session, tenant, after)
        key, at = tuple_(File.created_at, File.id), (cursor.created_at, cursor.id)
        query = query.where(key < at if newest_first else key > at)
    ordering = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
    rows = session.scalars(query.order_by(*ordering).limit(limit + 1)).all()
    data = views.readable(rows[:limit], views.file_object)
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(data=data, first_id=first, last_id=last, has_more=len(rows) > limit)


@router.get("/{file_id}", response_model=FileObject, responses=documented(404))
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    """One file's description."""
    row = owned.file_or_404(session, tenant, file_id)
    return views.file_object(row)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={**documented(404), 200: {"content": {"application/octet-stream": {}}}},
)
def get_file_content(file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> StreamingResponse:
    """The bytes of a file the tenant owns, streamed from the artifact store (an upload as its validated JSONL,
    a fine-tune's result files as written); another tenant's file is a 404."""
    row = owned.file_or_404(session, tenant, file_id)
    try:
        chunks = ArtifactStore.from_settings(settings).chunks(row.path)
    except ArtifactMissing:
        raise FileNotFound(f"file {file_id!r} has no stored content") from None
    disposition = f'attachment; filename="{_ascii_name(row.filename)}"'
    if _ascii_name(row.filename) != row.filename:  # the name itself too, for clients that read RFC 6266's form
        disposition += f"; filename*=UTF-8''{quote(row.filename, safe='')}"
    headers = {"Content-Disposition": disposition}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


def _ascii_name(filename: str) -> str:
    """A file name a header can carry: ASCII without quotes or backslashes (others become `_`)."""
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename) or "file"


@router.delete("/{file_id}", response_model=FileDeleted, responses=documented(404))
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> FileDeleted:
    """Deletes a file and its stored records (jobs that already used it keep their results)."""
    row = owned.file_or_404(session, tenant, file_id)
    session.delete(row)
    session.commit()
    ArtifactStore.from_settings(settings).delete(row.path)  # after the commit: a row never names a missing file
    return FileDeleted(id=file_id, deleted=True)
