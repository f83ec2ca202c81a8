"""The artifact store: where uploaded files, checkpoints and adapters live, and safe paths into it.

Rows store paths relative to the store; every path is resolved here and must stay inside it.
"""

from __future__ import annotations

from pathlib import Path

from shared.settings import Settings


class OutsideStore(ValueError):
    """A path that would resolve outside the artifact store."""


def resolve(settings: Settings, relative: str | Path) -> Path:
    """The absolute path of a store-relative path; OutsideStore if it escapes the store."""
    root = settings.artifacts_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise OutsideStore(f"{relative!s} is outside the artifact store")
    return path


def relative(settings: Settings, path: Path) -> str:
    """The store-relative form of an absolute path inside the store."""
    return str(path.resolve().relative_to(settings.artifacts_dir.resolve()))


def file_path(file_id: str) -> str:
    """Store-relative path of an uploaded file's validated JSONL."""
    return f"files/{file_id}.jsonl"


def job_dir(job_id: str) -> str:
    """Store-relative folder of a fine-tune's checkpoints: one checkpoints_dir per attempt under it."""
    return f"jobs/{job_id}"


def checkpoints_dir(job_id: str, attempt: int) -> str:
    """Store-relative folder of the checkpoints one attempt of a fine-tune writes (and only that attempt)."""
    return f"{job_dir(job_id)}/attempt-{attempt}/checkpoints"


def adapter_dir(job_id: str, attempt: int) -> str:
    """Store-relative folder of the adapter and manifest one attempt of a fine-tune writes.

    Each attempt has its own, so an attempt that lost its claim never touches the files of the attempt
    whose success was recorded; the fine-tuned model row names the folder of that attempt.
    """
    return f"adapters/{job_id}/attempt-{attempt}"
