"""A generate worker's local disk cache of adapters pulled from the artifact store: bounded, LRU, checked.

An adapter is fetched on first use into a temporary folder, each file checked against the sha256 its
manifest lists, and renamed into place, so a folder in the cache is always complete and checked. Each use
touches the folder's time; when the cache holds more than its limit, the least recently used folders go,
never the one in use. Worker processes on one host may share the cache folder: a file lock serializes
fetching, evicting and loading, so no process loads from a folder another is removing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.artifacts import ArtifactMissing, ArtifactStore, FileList, check_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredAdapter:
    """Where an adapter is in the store and the files its manifest lists (with their sizes and sha256)."""

    key: str
    files: FileList | None  # None for adapters published before manifests listed their files


@dataclass
class CacheStats:
    """What this process's cache did (read by bench/adapter_load.py)."""

    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    evicted: int = 0


class AdapterDiskCache:
    """Adapters fetched from the store into a local folder, at most max_bytes of them (LRU by folder time)."""

    def __init__(self, store: ArtifactStore, folder: Path, max_bytes: int) -> None:
        self.store = store
        self.folder = folder
        self.max_bytes = max_bytes
        self.stats = CacheStats()

    @contextmanager
    def local_copy(self, adapter: StoredAdapter) -> Iterator[Path]:
        """The adapter's local folder, fetched and checked on a miss; held (not evicted) until the block ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            target = self.folder / check_key(adapter.key).replace("/", "__")
            if target.is_dir():
                self.stats.hits += 1
                os.utime(target)  # most recently used
            else:
                self.stats.misses += 1
                self._fetch(adapter, target)
            self._evict(keep=target)
            yield target

    def _fetch(self, adapter: StoredAdapter, target: Path) -> None:
        started = time.perf_counter()
        files = adapter.files
        if files is None:  # published before manifests listed their files: sizes are all there is to check
            files = self.store.sizes(adapter.key)
            log.warning("adapter %s has no file list in its manifest; fetched without checksums", adapter.key)
        if not files:
            raise ArtifactMissing(f"adapter {adapter.key} is not in the artifact store")
        partial = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.folder))
        try:
            self.store.get_sealed(adapter.key, files, partial / "adapter")
            os.replace(partial / "adapter", target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        size = _size(target)
        self.stats.fetched_bytes += size
        log.info("adapter %s fetched from the artifact store: %d bytes in %.3f s, checksums match",
                 adapter.key, size, time.perf_counter() - started)  # fmt: skip

    def _evict(self, keep: Path) -> None:
        """Removes least recently used folders until the cache fits max_bytes (keep is never removed)."""
        folders = [p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: _size(p) for p in folders}
        total = sum(sizes.values())
        for victim in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if victim == keep:
                continue
            shutil.rmtree(victim, ignore_errors=True)
            total -= sizes[victim]
            self.stats.evicted += 1
            log.info("adapter cache: evicted %s (%d bytes)", victim.name, sizes[victim])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
