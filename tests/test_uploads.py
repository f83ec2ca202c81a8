"""No work before authentication, uploads validated off the event loop, and nothing left behind by an upload
that is refused, against a real gateway process on Postgres."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.systems import System, start_system

pytestmark = pytest.mark.e2e

MAX_UPLOAD = 12 * 2**20
RECORD = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n"


@pytest.fixture(scope="module")
def gateway(postgres_url: str, quiet_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    data = tmp_path_factory.mktemp("uploads")
    env = {"LLMQ_DATABASE_URL": postgres_url, "LLMQ_BROKER_URL": quiet_redis_url, "LLMQ_DATA_DIR": str(data),
           "LLMQ_BASE_MODEL": "test-base-model", "LLMQ_REQUIRE_API_KEYS": "true",
           "LLMQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "LLMQ_AUTH_FAILURES_PER_MINUTE": "0"}  # fmt: skip
    system = start_system(env, data / "logs", queues=())
    yield system
    system.children.stop_all()


@pytest.fixture
def tenant(postgres_url: str) -> tuple[str, dict[str, str]]:
    """A tenant of this test alone and its key's header."""
    from shared.api_keys import create_key
    from shared.db import make_engine

    name = f"uploads-{secrets.token_hex(4)}"
    with Session(make_engine(postgres_url)) as session:
        return name, {"Authorization": f"Bearer {create_key(session, name, 'test').token}"}


def connect(system: System) -> socket.socket:
    parts = urlsplit(system.base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def head(path: str, content_type: str, length: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("path", "content_type", "declared"),
    [
        ("/v1/files", "multipart/form-data; boundary=xyz", 11 * 2**20),
        ("/v1/generations", "application/json", 3 * 2**20),
    ],
)
def test_request_without_a_key_is_refused_before_its_body_is_read(
    gateway: System, path: str, content_type: str, declared: int
) -> None:
    with connect(gateway) as sock:
        sock.sendall(head(path, content_type, declared))
        sock.sendall(b"--xyz\r\n" + b"x" * 65536)  # a sliver of the body; the rest never comes
        sock.settimeout(5)
        answer = sock.recv(4096)  # times out if the gateway waits for the body before answering
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_health_answers_at_once_while_a_big_upload_is_validated(
    gateway: System, tenant: tuple[str, dict[str, str]]
) -> None:
    content = RECORD.encode() * 190_000  # about 10 MB of short records: seconds of validation on these cores
    result: dict[str, object] = {}

    def upload() -> None:
        started = time.monotonic()
        response = httpx.post(f"{gateway.base_url}/v1/files", headers=tenant[1], timeout=120,
                              files={"file": ("big.jsonl", content)}, data={"purpose": "fine-tune"})  # fmt: skip
        result["status"], result["seconds"] = response.status_code, time.monotonic() - started

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    with httpx.Client(base_url=gateway.base_url, timeout=60) as client:
        while thread.is_alive():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    thread.join()
    assert result["status"] == 200
    # Validating on the event loop held every other request for most of the upload's time.
    assert len(latencies) >= 5
    assert max(latencies) < float(result["seconds"]) / 3, (max(latencies), result["seconds"])  # type: ignore[arg-type]


def _disconnect_mid_body(system: System, headers: dict[str, str]) -> None:
    with connect(system) as sock:
        sock.sendall(head("/v1/files", "multipart/form-data; boundary=xyz", 5 * 2**20, headers))
        sock.sendall(b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
        sock.sendall(RECORD.encode() * 20_000)
    time.sleep(1)  # the gateway notices the closed connection


def _nul_in_filename(system: System, headers: dict[str, str]) -> httpx.Response:
    """An upload whose file name holds a NUL byte, which Postgres cannot store in a text column."""
    body = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a\x00.jsonl"\r\n\r\n'
            + RECORD.encode() * 10 + b"\r\n--xyz--\r\n")  # fmt: skip
    return httpx.post(f"{system.base_url}/v1/files", content=body,
                      headers=headers | {"Content-Type": "multipart/form-data; boundary=xyz"})  # fmt: skip


def _post(system: System, headers: dict[str, str], content: bytes, purpose: str = "fine-tune") -> httpx.Response:
    return httpx.post(f"{system.base_url}/v1/files", headers=headers, timeout=60,
                      files={"file": ("a.jsonl", content)}, data={"purpose": purpose})  # fmt: skip


# What each refusal sends (with the tenant's key header) and the status it answers (None: no answer read).
REFUSALS = {
    "unstorable file name": (_nul_in_filename, 400),
    "bad record": (lambda s, h: _post(s, h, RECORD.encode() * 100 + b'{"instruction": 1}\n'), 400),
    "too large": (lambda s, h: _post(s, h, RECORD.encode() * (MAX_UPLOAD // len(RECORD) + 2000)), 413),
    "no key": (lambda s, h: _post(s, {}, RECORD.encode()), 401),
    "wrong purpose": (lambda s, h: _post(s, h, RECORD.encode(), purpose="x"), 400),
    "client gone": (_disconnect_mid_body, None),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_upload_leaves_no_file_and_no_row(
    gateway: System, tenant: tuple[str, dict[str, str]], postgres_url: str, refusal: str
) -> None:
    from shared.db import make_engine
    from shared.models import File

    files = Path(gateway.env["LLMQ_DATA_DIR"]) / "artifacts" / "files"
    before = set(files.iterdir()) if files.exists() else set()
    send, expected = REFUSALS[refusal]
    response = send(gateway, tenant[1])
    if expected is not None:
        assert response.status_code == expected, response.text
        assert response.json()["error"]["code"]
    after = set(files.iterdir()) if files.exists() else set()
    assert after == before
    with Session(make_engine(postgres_url)) as session:
        assert session.scalar(select(func.count()).select_from(File).where(File.tenant == tenant[0])) == 0
    assert httpx.get(f"{gateway.base_url}/v1/files", headers=tenant[1]).json()["data"] == []
