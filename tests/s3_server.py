"""A real S3-protocol server for tests: moto's server mode (what s3fs's own tests use) as a child process."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ACCESS_KEY, SECRET_KEY, REGION = "llmq-test", "llmq-test-secret", "us-east-1"


@dataclass
class S3Server:
    """moto_server on host:port; stop() ends it (moto keeps everything in memory: nothing outlives it)."""

    host: str
    port: int
    log: Path
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", ns] to run it elsewhere
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        command = [binary] if binary else [sys.executable, "-m", "moto.server"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *command, "-H", self.host, "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {self.log}")
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"moto_server not answering at {self.endpoint} after {timeout} s")

    def create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        client.create_bucket(Bucket=bucket)

    def env(self, url: str) -> dict[str, str]:
        """LLMQ_* settings that point llmq's artifact store at url (s3://bucket/prefix) on this server."""
        return {
            "LLMQ_ARTIFACT_URL": url,
            "LLMQ_S3_ENDPOINT_URL": self.endpoint,
            "LLMQ_S3_REGION": REGION,
            "LLMQ_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "LLMQ_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
