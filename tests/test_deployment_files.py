"""Pins the deployment files: docker-compose.yml, the two Dockerfiles, .dockerignore and the CI workflow.

Docker does not run where this project is built, so these tests read the files and check what a broken
deployment would get wrong: start order, durability of the broker, GPU reservations, scalability of the
generate workers, an artifact store that no two services share a disk for, and that every command names code
that exists in the repo.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import tomllib
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GATEWAY_DOCKERFILE = REPO / "docker" / "gateway.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
CI_WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"

SERVICES = {"postgres", "redis", "minio", "minio-bucket", "migrate", "gateway", "worker-generate", "worker-train"}
APP_SERVICES = ("migrate", "gateway", "worker-generate", "worker-train")
WORKERS = ("worker-generate", "worker-train")


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return _load_yaml(CI_WORKFLOW)


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Gives each dependency of a service with its condition (the short list form means service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Gives source -> container path for each volume of a service, short or long syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts[source] = target
    return mounts


def _gateway_image_services(services: dict[str, Any]) -> set[str]:
    return {
        name for name, svc in services.items() if svc.get("build", {}).get("dockerfile") == "docker/gateway.Dockerfile"
    }


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Gives (INSTRUCTION, arguments) for each instruction, with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _pip_installs(path: Path) -> list[list[str]]:
    """Gives the arguments of every `pip install` that a RUN instruction executes."""
    installs = []
    for keyword, args in _dockerfile_instructions(path):
        if keyword != "RUN":
            continue
        # punctuation_chars splits `&&`, `;` and `|` into tokens of their own, outside quotes only.
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                rest = words[i + 2 :]
                end = next((j for j, word in enumerate(rest) if set(word) <= set("&;|<>()")), len(rest))
                installs.append(rest[:end])
    return installs


def _dockerfile_cmd(path: Path) -> list[str]:
    cmds = [args for keyword, args in _dockerfile_instructions(path) if keyword == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    return json.loads(cmds[-1])


def _torch_pin() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [dep for dep in pyproject["project"]["optional-dependencies"]["worker"] if dep.startswith("torch==")]
    assert len(pins) == 1, "the worker extra pins torch exactly once"
    return pins[0]


def _find_repo_module(dotted: str) -> ModuleSpec | None:
    """Gives the spec of a module found in the repository's own source tree, without importing anything.

    importlib.util.find_spec would import the parent packages (and their imports, torch included) and
    could find an installed copy instead of the source that the images copy; walking the path finder
    from the repo root does neither.
    """
    search_path: list[str] | None = [str(REPO)]
    spec = None
    parts = dotted.split(".")
    for i in range(len(parts)):
        if search_path is None:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), search_path)
        if spec is None:
            return None
        search_path = list(spec.submodule_search_locations or []) or None
    return spec


def _assert_uvicorn_target_exists(argv: list[str]) -> None:
    target = next(arg for arg in argv[1:] if not arg.startswith("-"))
    module, _, attribute = target.partition(":")
    spec = _find_repo_module(module)
    assert spec is not None and spec.origin, f"uvicorn target module {module!r} does not exist in the repo"
    tree = ast.parse(Path(spec.origin).read_text())
    top_level = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    top_level |= {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert attribute in top_level, f"{module} defines no top-level {attribute!r} for uvicorn"


def _assert_command_names_real_code(argv: list[str]) -> None:
    program = argv[0]
    if program == "uvicorn":
        _assert_uvicorn_target_exists(argv)
    elif program == "celery":
        app_module = argv[argv.index("-A") + 1]
        assert _find_repo_module(app_module) is not None, f"celery app module {app_module!r} does not exist"
    elif program == "alembic":
        assert (REPO / "alembic.ini").is_file(), "alembic.ini is missing at the repo root"
        assert (REPO / "migrations" / "env.py").is_file(), "migrations/env.py is missing"
    else:
        pytest.fail(f"unexpected program in a command: {argv}")


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_defines_the_six_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES


def test_postgres_and_redis_report_health(services: dict[str, Any]) -> None:
    assert "pg_isready" in " ".join(_argv(services["postgres"]["healthcheck"]["test"]))
    assert "ping" in _argv(services["redis"]["healthcheck"]["test"])


def test_redis_persists_messages_and_never_evicts_them(services: dict[str, Any]) -> None:
    argv = _argv(services["redis"]["command"])
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"


def test_postgres_and_redis_keep_data_in_named_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert _mounts(services["postgres"]).get("pgdata") == "/var/lib/postgresql/data"
    assert _mounts(services["redis"]).get("redisdata") == "/data"
    assert {"pgdata", "redisdata", "miniodata"} <= set(compose["volumes"])
    assert _mounts(services["minio"]).get("miniodata") == "/data"


def test_migrate_runs_once_after_postgres_is_healthy(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert _argv(migrate["command"]) == ["alembic", "upgrade", "head"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    assert migrate.get("restart") == "no"


@pytest.mark.parametrize("name", ["gateway", *WORKERS])
def test_gateway_and_workers_start_after_migrations_and_healthy_backends(services: dict[str, Any], name: str) -> None:
    deps = _depends_on(services[name])
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("redis") == "service_healthy"


def test_gateway_publishes_port_8000_and_checks_readyz(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert "8000:8000" in [str(port) for port in gateway["ports"]]
    assert "/readyz" in " ".join(_argv(gateway["healthcheck"]["test"]))


@pytest.mark.parametrize("name", WORKERS)
def test_workers_are_healthy_while_their_heartbeat_is_fresh(services: dict[str, Any], name: str) -> None:
    argv = _argv(services[name]["healthcheck"]["test"])
    assert argv[:4] == ["CMD", "python", "-m", "worker.healthcheck"]
    assert (REPO / "worker" / "healthcheck.py").is_file()


@pytest.mark.parametrize("name", WORKERS)
def test_workers_drain_within_their_stop_grace_period(services: dict[str, Any], name: str) -> None:
    from shared.settings import Settings

    grace = services[name]["stop_grace_period"]
    seconds = int(grace[:-1]) * (60 if grace.endswith("m") else 1)
    drain = services[name]["environment"]["LLMQ_DRAIN_SECONDS"]
    default = float(re.fullmatch(r"\$\{LLMQ_DRAIN_SECONDS:-(\d+)\}", drain).group(1))  # type: ignore[union-attr]
    assert default == Settings.model_fields["drain_seconds"].default
    assert seconds >= default + 20, f"{name}: SIGKILL could cut the drain short"


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose's own tags: `!reset` (remove what the base file sets) as the marker RESET."""


RESET = "<reset>"
_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def test_cpu_override_runs_the_workers_without_gpus_on_the_cpu_torch_wheel() -> None:
    override = yaml.load((REPO / "docker-compose.cpu.yml").read_text(), Loader=_ComposeLoader)
    for name in WORKERS:
        worker = override["services"][name]
        assert worker["deploy"] == RESET
        assert worker["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
        assert worker["environment"]["LLMQ_DEVICE"] == "cpu"
        assert worker["image"] != "llmq-worker:latest"  # a CPU build never replaces the GPU image's tag
    assert "ARG TORCH_INDEX_URL" in WORKER_DOCKERFILE.read_text()


def test_migrate_and_gateway_use_the_gateway_image(services: dict[str, Any]) -> None:
    assert {"migrate", "gateway"} <= _gateway_image_services(services)
    assert services["migrate"]["image"] == services["gateway"]["image"]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_use_the_worker_image(services: dict[str, Any], name: str) -> None:
    assert services[name]["build"]["dockerfile"] == "docker/worker.Dockerfile"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_reserve_an_nvidia_gpu(services: dict[str, Any], name: str) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpus, f"{name} reserves no nvidia GPU"
    assert gpus[0].get("count") == "all" or int(gpus[0].get("count", 0)) >= 1


@pytest.mark.parametrize("name", WORKERS)
def test_workers_are_scalable_without_fixed_names_or_host_ports(services: dict[str, Any], name: str) -> None:
    assert "container_name" not in services[name]
    assert "ports" not in services[name]


@pytest.mark.parametrize(("name", "queue"), [("worker-generate", "generate"), ("worker-train", "train")])
def test_each_worker_consumes_its_own_queue_one_task_at_a_time(services: dict[str, Any], name: str, queue: str) -> None:
    argv = _argv(services[name]["command"])
    assert argv[:4] == ["celery", "-A", "worker.app", "worker"]
    assert argv[argv.index("-Q") + 1] == queue
    assert argv[argv.index("--pool") + 1] == "solo"
    assert argv[argv.index("--concurrency") + 1] == "1"


def test_gateway_and_workers_share_no_disk_for_artifacts(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "artifacts" not in compose["volumes"]
    assert _mounts(services["gateway"]) == {}
    for name in WORKERS:
        env = services[name]["environment"]
        # Only the hub's download cache of the base model is a volume; the data dir (scratch, adapter cache)
        # is the container's own.
        assert list(_mounts(services[name]).values()) == [env["HF_HOME"]]
        assert env["HF_HOME"] != env["LLMQ_DATA_DIR"]


def test_app_services_keep_artifacts_in_the_minio_bucket_that_the_one_shot_creates(services: dict[str, Any]) -> None:
    env = services["gateway"]["environment"]
    url = urlsplit(env["LLMQ_ARTIFACT_URL"])
    assert url.scheme == "s3" and url.path.strip("/")
    assert urlsplit(env["LLMQ_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["LLMQ_S3_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["LLMQ_S3_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert "LLMQ_ADAPTER_CACHE_BYTES" in env  # the generate workers' local cache is sized on purpose
    bucket = services["minio-bucket"]
    assert f"mc mb --ignore-existing store/{url.hostname}" in " ".join(_argv(bucket["command"]))
    assert _depends_on(bucket) == {"minio": "service_healthy"} and bucket.get("restart") == "no"
    assert "ready" in _argv(services["minio"]["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["gateway", *WORKERS])
def test_gateway_and_workers_start_once_the_bucket_exists(services: dict[str, Any], name: str) -> None:
    assert _depends_on(services[name]).get("minio-bucket") == "service_completed_successfully"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_reach_postgres_and_redis_by_service_name(services: dict[str, Any], name: str) -> None:
    env = services[name]["environment"]
    database = urlsplit(env["LLMQ_DATABASE_URL"])
    broker = urlsplit(env["LLMQ_BROKER_URL"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres"
    assert broker.scheme == "redis" and broker.hostname == "redis"
    assert {"LLMQ_BASE_MODEL", "LLMQ_BASE_MODEL_REVISION", "LLMQ_QUANTIZATION"} <= set(env)


def test_app_services_share_one_environment(services: dict[str, Any]) -> None:
    environments = [services[name]["environment"] for name in APP_SERVICES]
    assert all(env == environments[0] for env in environments)


# --- every command names code that exists -------------------------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_command_names_a_real_module(services: dict[str, Any], name: str) -> None:
    _assert_command_names_real_code(_argv(services[name]["command"]))


@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_cmd_names_a_real_module(dockerfile: Path) -> None:
    _assert_command_names_real_code(_dockerfile_cmd(dockerfile))


@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_only_paths_that_exist(dockerfile: Path) -> None:
    for keyword, args in _dockerfile_instructions(dockerfile):
        if keyword == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"


# --- Dockerfiles --------------------------------------------------------------------------------


def test_gateway_image_installs_the_project_without_the_worker_extra_or_torch() -> None:
    installs = _pip_installs(GATEWAY_DOCKERFILE)
    assert ["--no-cache-dir", "."] in installs
    for args in installs:
        for arg in args:
            assert "worker" not in arg, f"gateway image installs the worker extra: pip install {args}"
            assert not arg.startswith("torch"), f"gateway image installs torch: pip install {args}"


def test_gateway_image_serves_the_app_factory_on_port_8000_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions(GATEWAY_DOCKERFILE)
    assert ("EXPOSE", "8000") in instructions
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "urllib" in healthchecks[0] and "/healthz" in healthchecks[0]
    argv = _dockerfile_cmd(GATEWAY_DOCKERFILE)
    assert argv[:3] == ["uvicorn", "gateway.app:create_app", "--factory"]
    assert argv[argv.index("--port") + 1] == "8000"


def test_worker_image_installs_the_worker_extra_and_the_pinned_torch() -> None:
    installs = _pip_installs(WORKER_DOCKERFILE)
    assert any(".[worker]" in args for args in installs)
    torch_args = [arg for args in installs for arg in args if arg.startswith("torch")]
    assert torch_args and set(torch_args) == {_torch_pin()}


def test_worker_image_keeps_the_hub_cache_on_the_data_volume_and_runs_the_generate_worker() -> None:
    envs = " ".join(args for keyword, args in _dockerfile_instructions(WORKER_DOCKERFILE) if keyword == "ENV")
    assert "HF_HOME=/data/hf" in envs
    argv = _dockerfile_cmd(WORKER_DOCKERFILE)
    assert argv[:4] == ["celery", "-A", "worker.app", "worker"]
    assert argv[argv.index("-Q") + 1] == "generate"


@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_the_same_non_root_user(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
    # Same uid in both images, so either may run any one-shot that writes under /data.
    assert any("--uid 10001" in args for keyword, args in instructions if keyword == "RUN")


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".llmq"} <= patterns
    assert not {"README.md", "*.md", "alembic.ini", "migrations", "shared", "gateway", "worker"} & patterns


# --- CI workflow --------------------------------------------------------------------------------


def test_ci_runs_on_push_and_pull_request(workflow: dict[str, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(triggers)


def test_ci_lint_job_runs_ruff_and_mypy_with_the_cpu_torch_wheel(workflow: dict[str, Any]) -> None:
    runs = "\n".join(step.get("run", "") for step in workflow["jobs"]["lint"]["steps"])
    assert "ruff check ." in runs
    assert re.search(r"^\s*mypy\b", runs, re.MULTILINE)
    assert f"{_torch_pin()} --index-url https://download.pytorch.org/whl/cpu" in runs


def test_ci_test_job_runs_on_debian_with_its_redis_postgres_and_chromium(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["test"]
    assert job["container"]["image"].endswith("-bookworm")
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    packages = re.search(r"apt-get install [^\n]*", runs)
    assert packages and {"redis-server", "postgresql", "chromium"} <= set(packages.group(0).split())
    # The chaos harness's Postgres binaries are the ones Debian installed.
    assert job["env"]["LLMQ_CHAOS_PG_BIN"] == "/usr/lib/postgresql/15/bin"
    assert "service postgresql start" in runs and "redis-server --port 6379" in runs
    assert urlsplit(job["env"]["LLMQ_TEST_DATABASE_URL"]).hostname == "localhost"
    assert urlsplit(job["env"]["LLMQ_TEST_REDIS_URL"]).hostname == "localhost"


def test_ci_test_job_installs_the_cpu_torch_wheel_into_the_venv_before_setup(workflow: dict[str, Any]) -> None:
    runs = "\n".join(step.get("run", "") for step in workflow["jobs"]["test"]["steps"])
    cpu = runs.index(f".venv/bin/python -m pip install {_torch_pin()} --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < runs.index("scripts/setup") < runs.index("scripts/test")
    assert any("actions/cache" in str(step.get("uses", "")) for step in workflow["jobs"]["test"]["steps"])


def test_ci_fails_when_a_chaos_or_dashboard_test_skips(workflow: dict[str, Any], tmp_path: Path) -> None:
    steps = workflow["jobs"]["test"]["steps"]
    (guard,) = [step for step in steps if "ci_skip_guard.py" in step.get("run", "")]
    assert guard.get("if") == "always()" and "artifacts/junit.xml" in guard["run"]
    import subprocess
    import sys

    junit = tmp_path / "junit.xml"
    case = '<testcase classname="{}" name="t"><skipped message="{}"/></testcase>'
    fine = case.format("tests.test_adapters", "not here")
    junit.write_text(f"<testsuites><testsuite>{fine}</testsuite></testsuites>")
    script = [sys.executable, str(REPO / "scripts" / "ci_skip_guard.py"), str(junit)]
    assert subprocess.run(script, capture_output=True).returncode == 0
    junit.write_text(f"<testsuites><testsuite>{fine}{case.format('tests.chaos.test_train_chaos', 'no redis-server')}"
                     "</testsuite></testsuites>")  # fmt: skip
    refused = subprocess.run(script, capture_output=True, text=True)
    assert refused.returncode == 1 and "no redis-server" in refused.stderr


def test_ci_test_job_runs_scripts_test_and_always_uploads_artifacts(workflow: dict[str, Any]) -> None:
    steps = workflow["jobs"]["test"]["steps"]
    assert any(step.get("run", "").strip().startswith("scripts/test") for step in steps)
    uploads = [step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0].get("if") == "always()"
    assert uploads[0]["with"]["path"].rstrip("/") == "artifacts"


def test_ci_test_command_exists_and_is_executable() -> None:
    script = REPO / "scripts" / "test"
    assert script.is_file() and os.access(script, os.X_OK), "scripts/test is missing or not executable"


def test_compose_gateway_requires_api_keys() -> None:
    compose = _load_yaml(REPO / "docker-compose.yml")
    assert compose["services"]["gateway"]["environment"]["LLMQ_REQUIRE_API_KEYS"] == "true"
