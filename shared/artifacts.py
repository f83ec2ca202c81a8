"""The artifact store: uploaded files, checkpoints and adapters, in a local folder or an S3 bucket (fsspec).

`LLMQ_ARTIFACT_URL` says where: `file:///path` (unset: `<data_dir>/artifacts`) or `s3://bucket/prefix`
through s3fs (endpoint, region and credentials from settings, else the usual AWS variables). Everything that
reads or writes an artifact goes through ArtifactStore, and only this module knows how keys are laid out.
A key is a store-relative POSIX path ("files/file-abc.jsonl"); rows hold keys, never a host's paths, so any
host that reaches the store can read what any other wrote.

Completeness never rests on the store writing atomically (an S3 object appears whole, a local file does
not): an uploaded file is complete once its row is committed; a folder (a checkpoint, an adapter) once its
seal exists, a JSON file written after every other file that lists them with their sizes and sha256. A
reader takes only sealed folders and checks each file it fetches against the seal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from shared.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FileList = dict[str, dict[str, Any]]  # file name (POSIX, relative to its folder) -> {"bytes", "sha256"}

CHECKPOINT_SEAL = "checkpoint_complete.json"  # written last into a stored checkpoint: {"files": FileList}
ADAPTER_SEAL = "manifest.json"  # written last into a stored adapter: the manifest, whose "files" lists the rest

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


class OutsideStore(ValueError):
    """A key that is not a plain store-relative path (absolute, `..`, empty parts, odd characters)."""


class ArtifactMissing(FileNotFoundError):
    """A key, or a file a seal lists, that the store does not hold."""


class ChecksumMismatch(ValueError):
    """A fetched file whose size or sha256 is not what its seal says."""


# -- where things go ------------------------------------------------------------------------------------


def file_key(file_id: str) -> str:
    """Key of an uploaded file's validated JSONL."""
    return f"files/{file_id}.jsonl"


def checkpoints_key(job_id: str, attempt: int) -> str:
    """Folder of the checkpoints one attempt of a fine-tune writes (and only that attempt)."""
    return f"jobs/{job_id}/attempt-{attempt}/checkpoints"


def checkpoint_key(job_id: str, attempt: int, step: int) -> str:
    """Folder of one stored checkpoint."""
    return f"{checkpoints_key(job_id, attempt)}/checkpoint-{step}"


def checkpoint_pattern(job_id: str, attempt: int | None = None) -> str:
    """Glob of the checkpoint folders of one attempt of a fine-tune, or of every attempt (None)."""
    return f"jobs/{job_id}/attempt-{'*' if attempt is None else attempt}/checkpoints/checkpoint-*"


def adapter_key(job_id: str, attempt: int) -> str:
    """Folder of the adapter and manifest one attempt of a fine-tune writes.

    Each attempt has its own, so an attempt that lost its claim never touches the files of the attempt
    whose success was recorded; the fine-tuned model row names the folder of that attempt.
    """
    return f"adapters/{job_id}/attempt-{attempt}"


def results_key(job_id: str, attempt: int) -> str:
    """Folder of the result files (adapter archive, metrics CSV) one attempt of a fine-tune publishes; each is
    a file row of the tenant (purpose fine-tune-results), downloadable like an upload."""
    return f"results/{job_id}/attempt-{attempt}"


def export_key(export_id: str, attempt: int) -> str:
    """Folder of the archive one attempt of an export writes (worker/export.py), a file row of the tenant."""
    return f"exports/{export_id}/attempt-{attempt}"


def check_key(key: str) -> str:
    """The key itself when it is a plain relative path; OutsideStore otherwise (keys may come from rows)."""
    parts = key.split("/")
    if not key or any(not _PART.fullmatch(part) for part in parts):
        raise OutsideStore(f"{key!r} is not a key inside the artifact store")
    return key


# -- sealed folders ---------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_folder(folder: Path, leave_out: tuple[str, ...] = ()) -> FileList:
    """Every file under a local folder (recursively) with its size and sha256, leaving out the named ones."""
    files: FileList = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in leave_out:
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return files


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


# -- the store --------------------------------------------------------------------------------------------


def storage_options(settings: Settings) -> dict[str, Any]:
    """fsspec options for the store's URL: s3fs's endpoint, region and credentials (unset ones left to the
    AWS chain), no listing cache (other hosts write meanwhile); a local folder creates parents as it writes."""
    url = settings.resolved_artifact_url
    if url.startswith("s3://"):
        options: dict[str, Any] = {"use_listings_cache": False}
        if settings.s3_endpoint_url:
            options["endpoint_url"] = settings.s3_endpoint_url
        if settings.s3_region:
            options["client_kwargs"] = {"region_name": settings.s3_region}
        if settings.s3_access_key_id:
            options["key"] = settings.s3_access_key_id
        if settings.s3_secret_access_key:
            options["secret"] = settings.s3_secret_access_key.get_secret_value()
        return options
    if url.startswith("file://"):
        return {"auto_mkdir": True}
    return {}


class ArtifactStore:
    """Reads and writes artifacts by key, on whatever filesystem the URL names."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        fs, root = url_to_fs(self.url, **(options or {}))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        """The store the settings name (fsspec keeps one filesystem object per URL and options)."""
        return cls(settings.resolved_artifact_url, storage_options(settings))

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _key(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    # -- single objects --

    def put_file(self, local: Path, key: str) -> None:
        """Copies a local file into the store (s3fs streams it in parts; never read whole into memory)."""
        self.fs.put_file(str(local), self._path(key))

    def put_bytes(self, data: bytes, key: str) -> None:
        """Writes a small file (a batch's output) into the store from memory."""
        self.fs.pipe_file(self._path(key), data)

    def get_file(self, key: str, local: Path) -> None:
        """Copies a stored file to a local path; ArtifactMissing when the store has none."""
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get_file(self._path(key), str(local))
        except FileNotFoundError as exc:
            raise ArtifactMissing(f"{key} is not in the artifact store") from exc

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        """A stored file opened for reading (streamed); ArtifactMissing when the store has none."""
        try:
            f = self.fs.open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ArtifactMissing(f"{key} is not in the artifact store") from exc
        with f:
            yield f

    def chunks(self, key: str) -> Iterator[bytes]:
        """A stored file's bytes in chunks of CHUNK, for streaming it to a client. The file is opened now, so
        ArtifactMissing comes at once (before any answer starts); it is closed when the iterator ends or is closed."""
        try:
            f = self.fs.open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ArtifactMissing(f"{key} is not in the artifact store") from exc
        return _read_chunks(f)

    def read_json(self, key: str) -> Any:
        """A stored JSON document; ArtifactMissing when the store has none."""
        with self.open(key) as f:
            return json.loads(f.read())

    def write_json(self, key: str, value: Any) -> None:
        self.fs.pipe_file(self._path(key), json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def glob(self, pattern: str) -> list[str]:
        """Keys matching a glob pattern (of this module's layout functions), sorted."""
        return sorted(self._key(p) for p in self.fs.glob(self._path_pattern(pattern)))

    def _path_pattern(self, pattern: str) -> str:
        check_key(pattern.replace("*", "x"))
        return f"{self.root}/{pattern}"

    def delete(self, key: str) -> None:
        """Removes a stored file, or a folder and everything under it; nothing to remove is fine."""
        path = self._path(key)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # -- sealed folders --

    def put_sealed(self, folder: Path, key: str, seal: str, seal_body: dict[str, Any] | None = None) -> FileList:
        """Copies every file of a local folder under key, then writes the seal (seal_body plus the file list)
        last: a reader that finds the seal finds every file. The file list."""
        files = list_folder(folder, leave_out=(seal,))
        for name in files:
            self.put_file(folder / name, f"{key}/{name}")
        self.write_json(f"{key}/{seal}", {**(seal_body or {}), "files": files})
        return files

    def get_sealed(self, key: str, files: FileList, local: Path) -> None:
        """Fetches the files a seal lists into a new local folder, each checked against its size and sha256;
        ChecksumMismatch or ArtifactMissing (the folder removed) when one is not what the seal says."""
        try:
            for name, expected in files.items():
                check_key(name)
                target = local / name
                self.get_file(f"{key}/{name}", target)
                size = target.stat().st_size
                digest = sha256_of(target) if "sha256" in expected else None
                if size != expected["bytes"] or digest != expected.get("sha256"):
                    raise ChecksumMismatch(
                        f"{key}/{name}: {size} bytes, sha256 {str(digest)[:12]}; the seal says "
                        f"{expected['bytes']} bytes, sha256 {str(expected.get('sha256'))[:12]}"
                    )
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise

    def sizes(self, key: str) -> FileList:
        """Every file under a stored folder with its size only (for folders stored before seals listed files)."""
        found = self.fs.find(self._path(key), detail=True)
        prefix = self._path(key) + "/"
        return {self.fs._strip_protocol(p)[len(prefix) :]: {"bytes": int(info["size"])} for p, info in found.items()}

    def sealed(self, pattern: str, seal: str) -> list[str]:
        """Keys of the folders matching a glob pattern that hold their seal (complete ones), sorted."""
        return [key.rsplit("/", 1)[0] for key in self.glob(f"{pattern}/{seal}")]

    def read_seal(self, key: str, seal: str) -> dict[str, Any]:
        """A stored folder's seal (its "files" list, and whatever else it holds); ArtifactMissing if unsealed."""
        body = self.read_json(f"{key}/{seal}")
        if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
            raise ArtifactMissing(f"{key}/{seal} lists no files")
        return body

    def is_sealed(self, key: str, seal: str) -> bool:
        return self.exists(f"{key}/{seal}")

    def unseal(self, key: str, seal: str) -> None:
        """Removes a stored folder, seal first: a folder half removed is never taken for complete."""
        self.delete(f"{key}/{seal}")
        self.delete(key)
