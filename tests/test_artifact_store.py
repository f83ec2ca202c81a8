"""The artifact store, the same tests on a local folder (file://) and on a real S3-protocol server (moto)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest

from shared import artifacts
from shared.artifacts import (
    CHECKPOINT_SEAL,
    ArtifactMissing,
    ArtifactStore,
    ChecksumMismatch,
    OutsideStore,
    storage_options,
)
from shared.settings import Settings
from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

BUCKET = "llmq-test"  # created by the s3_server fixture


@pytest.fixture
def settings(tmp_path: Path, artifact_settings: dict[str, str]) -> Settings:
    values = {k.removeprefix("LLMQ_").lower(): v for k, v in artifact_settings.items()}
    return Settings(data_dir=tmp_path / "data", **values)


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return ArtifactStore.from_settings(settings)


def folder_of(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / f"local-{secrets.token_hex(3)}"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def test_default_store_is_the_artifacts_folder_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_artifact_url == (tmp_path / "artifacts").resolve().as_uri()
    ArtifactStore.from_settings(settings).write_json("files/x.json", {"a": 1})
    assert (tmp_path / "artifacts" / "files" / "x.json").is_file()


@pytest.mark.parametrize("url", ["gs://bucket/x", "relative/folder", "file://host/x", "https://minio:9000/llmq"])
def test_an_artifact_url_that_is_neither_a_folder_nor_s3_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match="neither file:///absolute/path nor s3://bucket/prefix"):
        Settings(artifact_url=url)


def test_file_larger_than_a_chunk_goes_in_and_comes_out_byte_identical(store: ArtifactStore, tmp_path: Path) -> None:
    content = os.urandom(3 * artifacts.CHUNK + 17)
    source = tmp_path / "big.bin"
    source.write_bytes(content)
    store.put_file(source, "files/big.bin")
    store.get_file("files/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == content
    with store.open("files/big.bin") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(content).digest()


def test_sealed_folder_round_trips_and_is_listed_only_once_sealed(store: ArtifactStore, tmp_path: Path) -> None:
    local = folder_of(tmp_path, {"trainer_state.json": b"{}", "adapter_model.safetensors": b"w" * 1000, "sub/x": b"1"})
    key = artifacts.checkpoint_key("ftjob-a", 1, 4)
    # The files without their seal (a host that died while copying) are not a checkpoint.
    store.put_file(local / "trainer_state.json", f"{key}/trainer_state.json")
    assert store.sealed(artifacts.checkpoint_pattern("ftjob-a"), CHECKPOINT_SEAL) == []
    files = store.put_sealed(local, key, CHECKPOINT_SEAL)
    assert set(files) == {"trainer_state.json", "adapter_model.safetensors", "sub/x"}
    assert store.sealed(artifacts.checkpoint_pattern("ftjob-a"), CHECKPOINT_SEAL) == [key]
    store.get_sealed(key, store.read_seal(key, CHECKPOINT_SEAL)["files"], tmp_path / "fetched")
    for name in files:
        assert (tmp_path / "fetched" / name).read_bytes() == (local / name).read_bytes()


def test_unsealed_folder_is_gone_from_listings_and_from_the_store(store: ArtifactStore, tmp_path: Path) -> None:
    key = artifacts.checkpoint_key("ftjob-b", 2, 8)
    store.put_sealed(folder_of(tmp_path, {"a": b"1", "b": b"2"}), key, CHECKPOINT_SEAL)
    store.unseal(key, CHECKPOINT_SEAL)
    assert store.sealed(artifacts.checkpoint_pattern("ftjob-b", 2), CHECKPOINT_SEAL) == []
    assert not store.exists(f"{key}/a") and not store.is_sealed(key, CHECKPOINT_SEAL)
    store.unseal(key, CHECKPOINT_SEAL)  # nothing left to remove is fine


def test_fetch_of_a_file_that_is_not_what_the_seal_says_fails_and_keeps_nothing(
    store: ArtifactStore, tmp_path: Path
) -> None:
    key = artifacts.adapter_key("ftjob-c", 1)
    local = folder_of(tmp_path, {"adapter_model.safetensors": b"good weights"})
    files = store.put_sealed(local, key, "manifest.json")
    (local / "adapter_model.safetensors").write_bytes(b"evil weights")  # same size, other bytes
    store.put_file(local / "adapter_model.safetensors", f"{key}/adapter_model.safetensors")
    with pytest.raises(ChecksumMismatch, match=r"adapter_model\.safetensors"):
        store.get_sealed(key, files, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_missing_things_raise_artifact_missing(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactMissing):
        store.get_file("files/none.jsonl", tmp_path / "x")
    with pytest.raises(ArtifactMissing), store.open("files/none.jsonl"):
        pass
    with pytest.raises(ArtifactMissing):
        store.read_seal(artifacts.checkpoint_key("ftjob-none", 1, 1), CHECKPOINT_SEAL)
    store.delete("files/none.jsonl")  # nothing to delete is fine


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "files//x", "files/../../x", "files/./x", "", "a\\b", ".x"])
def test_keys_that_are_not_plain_relative_paths_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(OutsideStore):
        store.exists(key)


def test_a_write_by_another_host_is_seen_at_once(store: ArtifactStore, settings: Settings, tmp_path: Path) -> None:
    pattern = artifacts.checkpoint_pattern("ftjob-d")
    key = artifacts.checkpoint_key("ftjob-d", 1, 2)
    store.write_json(f"{key}/notes.json", {})
    # Listed and looked at once: a listing cache would now hold "no seal".
    assert store.sealed(pattern, CHECKPOINT_SEAL) == [] and not store.is_sealed(key, CHECKPOINT_SEAL)
    assert store.fs.ls(store.root + "/" + key)
    # Another host: its own store object and filesystem (no fsspec instance shared with this one).
    other = ArtifactStore(settings.resolved_artifact_url, {**storage_options(settings), "skip_instance_cache": True})
    other.put_sealed(folder_of(tmp_path, {"a": b"1"}), key, CHECKPOINT_SEAL)
    assert store.sealed(pattern, CHECKPOINT_SEAL) == [key] and store.is_sealed(key, CHECKPOINT_SEAL)


def test_s3_credentials_endpoint_and_region_come_from_the_usual_aws_variables(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    settings = Settings(data_dir=tmp_path, artifact_url=f"s3://{BUCKET}/aws-env-{secrets.token_hex(3)}")
    assert storage_options(settings) == {"use_listings_cache": False}  # nothing from llmq's own settings
    store = ArtifactStore(settings.resolved_artifact_url, {**storage_options(settings), "skip_instance_cache": True})
    store.write_json("files/x.json", {"a": 1})
    assert store.read_json("files/x.json") == {"a": 1}
