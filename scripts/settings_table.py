"""Prints the settings table of docs/OPERATIONS.md, generated from shared.settings.Settings.

    python scripts/settings_table.py           # print the markdown table
    python scripts/settings_table.py --write   # replace the table between the markers in docs/OPERATIONS.md
    python scripts/settings_table.py --check   # exit 1 when the table in the doc is stale

tests/test_docs.py fails when the doc's table differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from shared.settings import Settings  # noqa: E402

DOC = ROOT / "docs" / "OPERATIONS.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def _shown(value: Any) -> str:
    """A default as it would be written in the environment."""
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, Enum):
        value = value.value
    elif isinstance(value, list):
        value = "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table() -> str:
    """The markdown table of every setting: environment variable, default, description."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        variable = f"`{prefix}{name.upper()}`"
        lines.append(f"| {variable} | {_shown(_default(field))} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def replaced(document: str, new_table: str) -> str:
    """The document with new_table between the markers (ValueError when they are missing)."""
    head, start, rest = document.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"{START} ... {END} not found")
    return f"{head}{START}\n{new_table}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true", help="exit 1 when the table in the doc is stale")
    args = parser.parse_args()
    if not (args.write or args.check):
        sys.stdout.write(table())
        return 0
    document = DOC.read_text(encoding="utf-8")
    fresh = replaced(document, table())
    if args.check:
        if fresh != document:
            print(f"{DOC.relative_to(ROOT)}: the settings table is stale; run python scripts/settings_table.py --write")
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
