"""Fixtures: real Postgres and Redis (from LLMQ_TEST_* env or the local defaults), a tiny and a pretrained GPT-2,
and whole systems (gateway + Celery worker processes) started for a test session.

Only fixtures live here; tests import helpers from tests/servers.py, tests/process_settings.py and
tests/systems.py (never from conftest, which pytest imports under a name of its own).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.s3_server import S3Server
from tests.servers import TEST_REDIS_URL, own_database, redis_db
from tests.systems import System, free_port, start_system

S3_BUCKET = "llmq-test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session, dropped afterwards."""
    with own_database("llmq_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis database the running systems use, emptied once per session."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def quiet_redis_url() -> str:
    """A Redis database no worker consumes from, emptied once per session."""
    url = redis_db(13)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-protocol server (moto's server mode) on a free loopback port, with an empty bucket."""
    server = S3Server("127.0.0.1", free_port(), tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    server.create_bucket(S3_BUCKET)
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def artifact_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """LLMQ_* settings of an artifact store: the default folder under data_dir, or a fresh prefix of the S3
    server's bucket (the server starts only for the s3 case)."""
    if request.param == "file":
        return {}
    server: S3Server = request.getfixturevalue("s3_server")
    return server.env(f"s3://{S3_BUCKET}/{secrets.token_hex(6)}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT-2 built offline from the shipped corpus."""
    from worker.model_factory import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llmq's small GPT-2 pretrained on shipped English: the model for tests that need one that learns."""
    from worker.model_factory import install_pretrained_gpt2

    return install_pretrained_gpt2(tmp_path_factory.mktemp("models") / "small-gpt2")


@pytest.fixture(scope="session")
def production_system(
    postgres_url: str, redis_url: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """Gateway + generate worker on real Postgres and Redis, serving the tiny GPT-2."""
    data = tmp_path_factory.mktemp("prod-data")
    env = {
        "LLMQ_DATABASE_URL": postgres_url,
        "LLMQ_BROKER_URL": redis_url,
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": str(tiny_model),
        "HF_HUB_OFFLINE": "1",
        "LLMQ_WORKER_METRICS_PORT": str(free_port()),  # the generate worker's own /metrics
    }
    system = start_system(env, data / "logs")
    yield system
    system.children.stop_all()


@pytest.fixture(scope="session")
def embedded_system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway + generate worker on the embedded default (SQLite, file broker)."""
    from shared.migrate import upgrade

    data = tmp_path_factory.mktemp("embedded-data")
    upgrade(f"sqlite:///{data / 'llmq.db'}")
    env = {"LLMQ_DATA_DIR": str(data), "LLMQ_BASE_MODEL": str(tiny_model), "HF_HUB_OFFLINE": "1"}
    system = start_system(env, data / "logs")
    yield system
    system.children.stop_all()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test its own node id. Schemathesis gives all of a fuzz test's operations the function's id
    (`test_fuzz.py::test_fuzz_with_an_api_key`, the operation only in the item's name), and pytest-xdist's
    file scheduler (scripts/test) hands tests out by id: all but the first operation would silently not
    run. Such an item's id takes its name (`...::test_fuzz_with_an_api_key[POST /v1/files]`), as pytest's
    own parametrized tests have. `_id` is pytest 9's private attribute (pinned; tests/test_docs.py checks
    the ids are unique)."""
    from _pytest.nodeid import coerce_node_id

    counts = Counter(item.nodeid for item in items)
    for item in items:
        if counts[item.nodeid] > 1 and item.parent is not None:
            item._id = coerce_node_id(f"{item.parent.nodeid}::{item.name}")
