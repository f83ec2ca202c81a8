"""The suite itself: scripts/test hands whole files to two pytest-xdist processes by test id, so a test
whose id another test shares would silently not run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_collected_test_has_an_id_of_its_own() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    fuzz = [i for i in ids if i.startswith("tests/test_fuzz.py::test_fuzz_with")]
    assert len(fuzz) > 20, fuzz  # schemathesis's per-operation tests, each with its operation in its id
    shared = {nodeid: n for nodeid, n in Counter(ids).items() if n > 1}
    assert not shared, shared
