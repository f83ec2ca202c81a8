"""How many CPU threads torch uses in worker processes (LLMQ_TORCH_THREADS, and llmq up's split)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.processes import ROOT, threads_per_worker


def torch_threads_in_a_child(env: dict[str, str], code: str) -> int:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import torch; print(torch.get_num_threads())"],
        env={**inherited, **env}, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


def test_the_torch_threads_setting_caps_a_worker_process(tmp_path: Path) -> None:
    default = torch_threads_in_a_child({"LLMQ_DATA_DIR": str(tmp_path)}, "import worker.app")
    assert default == torch_threads_in_a_child({}, "pass")  # unset: torch's own default
    capped = torch_threads_in_a_child({"LLMQ_DATA_DIR": str(tmp_path), "LLMQ_TORCH_THREADS": "1"}, "import worker.app")
    assert capped == 1


@pytest.mark.parametrize(
    ("setting", "cores", "expected"),
    [(0, 2, 1), (0, 16, 8), (0, 1, 1), (3, 16, 3)],
)
def test_llmq_up_gives_each_worker_half_the_cores_unless_the_setting_says_otherwise(
    setting: int, cores: int, expected: int
) -> None:
    assert threads_per_worker(setting, workers=2, cores=cores) == expected
