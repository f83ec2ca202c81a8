"""Adapter load on a generate worker: cold (store -> disk cache -> loaded) against warm hits, side by side.

One process, the full-size GPT-2 architecture with random weights (4-bit nf4 by default) and random LoRA
adapters of the fine-tune defaults (r=16 on c_attn, c_proj, c_fc), through the worker's own code
(worker/adapters.py AdapterCache over worker/adapter_cache.py AdapterDiskCache over shared/artifacts.py):

- cold: the adapter in neither the disk cache nor memory: fetch every file from the store, check its
  sha256 against the manifest, rename into the cache, load it onto the base model;
- disk hit: in the disk cache (as after a worker restart), not in memory: load from the cache;
- memory hit: already loaded (the common case while an adapter is in use): nothing to do;
- fetch (a part of cold): store -> disk cache with the checksums, without loading.

Stores, in the same run: `file://` (a local folder) and `s3://` on moto's server mode on loopback (moto
is a Python server, slower than MinIO or S3: its figure is an upper bound of the S3 protocol cost here,
not of a real store). Each figure is the median of --repeats loads, each of a different adapter.

    python bench/adapter_load.py [--repeats 7] [--quantization nf4] [--stores file,s3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import loadavg, machine, ms  # bench/measure.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server on a free loopback port with a bucket "bench" (the `moto[server]` pin of the bench extra)."""

    def __init__(self, log: Path) -> None:
        import boto3
        import httpx

        self.endpoint = f"http://127.0.0.1:{free_port()}"
        port = self.endpoint.rsplit(":", 1)[1]
        moto = Path(sys.executable).parent / "moto_server"
        with log.open("ab") as out:
            self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", port], stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start; see {log}") from None
                time.sleep(0.1)
        keys = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret", "region_name": "us-east-1"}
        boto3.client("s3", endpoint_url=self.endpoint, **keys).create_bucket(Bucket="bench")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def store_for(kind: str, work: Path, server: Any) -> Any:
    from shared.artifacts import ArtifactStore
    from shared.settings import Settings

    if kind == "file":
        settings = Settings(data_dir=work, artifact_url=(work / "store").as_uri())
    else:
        settings = Settings(
            data_dir=work,
            artifact_url=f"s3://bench/{kind}-{time.time_ns()}",
            s3_endpoint_url=server.endpoint,
            s3_region="us-east-1",
            s3_access_key_id="bench",
            s3_secret_access_key="bench-secret",
        )
    return ArtifactStore.from_settings(settings)


def measure(kind: str, store: Any, loaded: Any, folders: list[Path], repeats: int, work: Path) -> dict[str, float]:
    """Median seconds of a cold load, a disk hit and a memory hit on one store."""
    from shared import artifacts
    from shared.artifacts import ADAPTER_SEAL
    from worker.adapter_cache import AdapterDiskCache, StoredAdapter
    from worker.adapters import AdapterCache

    stored = {}
    for i, folder in enumerate(folders[:repeats]):
        key = artifacts.adapter_key(f"bench{i}", 1)
        stored[f"ft:bench:{kind}:{i}"] = StoredAdapter(key, store.put_sealed(folder, key, ADAPTER_SEAL, {"bench": i}))
    disk = AdapterDiskCache(store, work / f"cache-{kind}", max_bytes=2**34)
    fetch_only = AdapterDiskCache(store, work / f"fetch-{kind}", max_bytes=2**34)
    fetch, cold, disk_hit, memory_hit = [], [], [], []
    for model_id, adapter in stored.items():
        started = time.perf_counter()
        with fetch_only.local_copy(adapter):  # store -> cache, every file checked; nothing loaded
            fetch.append(time.perf_counter() - started)
        cache = AdapterCache(loaded, capacity=1, disk=disk)
        started = time.perf_counter()
        cache.ensure({model_id: adapter})  # not in the disk cache, not loaded
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        cache.ensure({model_id: adapter})  # loaded
        memory_hit.append(time.perf_counter() - started)
        loaded.model.delete_adapter(cache.ensure({model_id: adapter})[model_id])  # as a restarted worker
        cache = AdapterCache(loaded, capacity=1, disk=disk)
        started = time.perf_counter()
        names = cache.ensure({model_id: adapter})  # in the disk cache only
        disk_hit.append(time.perf_counter() - started)
        loaded.model.delete_adapter(names[model_id])
    assert disk.stats.misses == len(stored) and disk.stats.hits == len(stored), disk.stats
    return {
        "fetch": statistics.median(fetch),
        "cold": statistics.median(cold),
        "disk hit": statistics.median(disk_hit),
        "memory hit": statistics.median(memory_hit),
        "bytes": sum(f["bytes"] for f in next(iter(stored.values())).files.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="adapters loaded per store (median reported)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--stores", default="file,s3", help="comma-separated: file, s3")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/llmq-bench-cache"))
    args = parser.parse_args()
    kinds = args.stores.split(",")

    from inference import make_adapters  # bench/inference.py: random LoRA adapters, cached

    from worker.model_factory import build_full_size_gpt2
    from worker.model_loading import load_base_model

    model_dir = build_full_size_gpt2(args.cache_dir / "gpt2-full-size")
    folders = make_adapters(model_dir, args.cache_dir / "adapters-r16", args.repeats, rank=16)
    loaded = load_base_model(str(model_dir), "main", args.quantization, "cpu")
    load_before = loadavg()

    server: MotoServer | None = None
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="llmq-adapter-load-") as tmp:
        work = Path(tmp)
        try:
            if "s3" in kinds:
                server = MotoServer(work / "moto.log")
            for kind in kinds:
                results[kind] = measure(kind, store_for(kind, work, server), loaded, folders, args.repeats, work)
        finally:
            if server is not None:
                server.stop()

    print(f"## adapter load: cold (store -> cache -> loaded) against warm hits, {args.quantization} full-size GPT-2\n")
    print(f"{machine()}; load average {load_before:.2f} before, {loadavg():.2f} after; median of {args.repeats}")
    print(f"adapters of {next(iter(results.values()))['bytes'] / 1e6:.1f} MB (LoRA r=16 on c_attn, c_proj, c_fc)\n")
    print("| store | cold ms | of which fetch ms | disk hit ms | memory hit ms | cold / disk hit | cold / memory hit |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        name = {"file": "file:// (local folder)", "s3": "s3:// (moto on loopback)"}[kind]
        print(
            f"| {name} | {ms(r['cold'], 1)} | {ms(r['fetch'], 1)} | {ms(r['disk hit'], 1)} | {ms(r['memory hit'], 3)} "
            f"| {r['cold'] / r['disk hit']:.2f}x | {r['cold'] / r['memory hit']:.0f}x |"
        )
    print(f"\ncommand: python bench/adapter_load.py --repeats {args.repeats} --quantization {args.quantization}")


if __name__ == "__main__":
    main()
