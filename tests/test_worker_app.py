"""How a worker process finds its tasks: Celery imports worker/tasks.py through `include`, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from shared.celery_app import TASKS

WORKER = Path(__file__).resolve().parent.parent / "worker"


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_a_worker_registers_both_tasks_through_include() -> None:
    from worker.app import app

    assert "worker.tasks" in app.conf.include
    app.loader.import_default_modules()  # what a starting worker does
    assert set(TASKS.values()) <= set(app.tasks)


def test_the_worker_app_and_its_tasks_do_not_import_each_other() -> None:
    assert not any(name.startswith("worker.tasks") for name in imported_modules(WORKER / "app.py"))
    assert not any(name.startswith("worker.app") for name in imported_modules(WORKER / "tasks.py"))
