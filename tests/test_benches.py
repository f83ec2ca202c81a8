"""The benchmarks still run against llmq's interfaces: bench/ is outside the suite's timed runs, so what ties it
to llmq (its arguments, how it loads adapters, the rows it writes) is pinned here, on the tiny model.

bench/inference.py once stopped with a TypeError after the adapter cache changed its signature, and again on
its untyped fine-tune params; nothing in the suite ran it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.models import FineTunedModel, Job
from tests.process_settings import configure
from worker.model_loading import load_base_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("measure.py", "systems.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_parses_its_arguments(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_inference_bench_loads_its_adapters_and_registers_them_as_fine_tuned_models(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their neighbours by name
    import inference

    folders = inference.make_adapters(tiny_model, tmp_path / "adapters", 2, rank=4)
    loaded = load_base_model(str(tiny_model), "main", "fp32", "cpu")
    names = inference.load_adapters(loaded, folders)
    assert names == ["bench0", "bench1"]
    assert set(names) <= set(loaded.model.peft_config)

    database = f"sqlite:///{tmp_path / 'llmq.db'}"
    configure(monkeypatch, database_url=database, data_dir=str(tmp_path / "data"))
    upgrade()
    ids = inference.register_adapters(database, str(tiny_model), tmp_path / "data", folders)
    with get_sessionmaker()() as session:
        models = list(session.scalars(select(FineTunedModel).where(FineTunedModel.id.in_(ids))))
        assert len(models) == 2
        jobs = [session.get(Job, m.job_id) for m in models]
        assert all(job is not None and job.status == "succeeded" for job in jobs)
