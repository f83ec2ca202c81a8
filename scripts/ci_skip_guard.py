"""Fails (exit 1) when a test that CI must run was skipped: the chaos suite and the dashboard tests skip
themselves where redis-server, the Postgres binaries or Chromium are missing, which on a CI runner means the
runner is set up wrong, not that the tests pass.

    python scripts/ci_skip_guard.py artifacts/junit.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MUST_RUN = ("tests.chaos.", "tests.test_dashboard")


def must_run_skips(junit: Path) -> list[str]:
    """The skipped test cases of the suites that must run: 'classname::name: reason'."""
    skipped = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname = case.get("classname", "")
        skip = case.find("skipped")
        if skip is not None and classname.startswith(MUST_RUN):
            skipped.append(f"{classname}::{case.get('name')}: {skip.get('message', '')}")
    return skipped


def main(argv: list[str]) -> int:
    junit = Path(argv[1] if len(argv) > 1 else "artifacts/junit.xml")
    if not junit.is_file():
        print(f"{junit} is missing: the test step did not run", file=sys.stderr)
        return 1
    skipped = must_run_skips(junit)
    for line in skipped:
        print(f"skipped in CI: {line}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
