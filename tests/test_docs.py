"""The docs stay true to the code: every endpoint in docs/API.md with examples, the settings table current."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "API.md"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
HEADING = re.compile(r"^### `(GET|POST|DELETE|PUT|PATCH) (/\S*)`$", re.M)


def settings_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_sections() -> dict[tuple[str, str], str]:
    """(method, path) -> the text of its section in docs/API.md."""
    text = API.read_text(encoding="utf-8")
    headings = list(HEADING.finditer(text))
    sections = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        end = following.start() if following else len(text)
        sections[(heading.group(1), heading.group(2))] = text[heading.end() : end]
    return sections


def served_endpoints() -> set[tuple[str, str]]:
    """(method, path) of every endpoint in the gateway's OpenAPI schema, plus the dashboard."""
    from gateway.app import create_app

    schema = create_app().openapi()
    endpoints = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    return endpoints | {("GET", "/ui")}


def test_settings_table_in_the_operations_doc_is_current() -> None:
    module = settings_table()
    document = OPERATIONS.read_text(encoding="utf-8")
    assert module.replaced(document, module.table()) == document, (
        "docs/OPERATIONS.md has a stale settings table: run python scripts/settings_table.py --write"
    )


def test_settings_table_names_every_setting_with_its_variable_default_and_description() -> None:
    from shared.settings import Settings

    rows = {line.split("|")[1].strip(" `"): line for line in settings_table().table().splitlines()[2:]}
    assert set(rows) == {f"LLMQ_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
    assert "| `LLMQ_LOG_FORMAT` | `json` |" in rows["LLMQ_LOG_FORMAT"]
    assert "| `LLMQ_DATABASE_URL` | *unset* |" in rows["LLMQ_DATABASE_URL"]


def test_a_changed_setting_makes_the_table_stale() -> None:
    module = settings_table()
    document = OPERATIONS.read_text(encoding="utf-8")
    edited = document.replace("| `LLMQ_MAX_N` | `8` |", "| `LLMQ_MAX_N` | `9` |")
    assert edited != document
    assert module.replaced(edited, module.table()) == document


def test_every_endpoint_is_documented_with_a_curl_and_a_python_example() -> None:
    sections = api_sections()
    missing = served_endpoints() - set(sections)
    assert not missing, f"docs/API.md lacks a section for {sorted(missing)}"
    for (method, path), text in sections.items():
        assert re.search(r"```bash\n[^`]*curl ", text), f"{method} {path}: no curl example"
        assert "```python\n" in text, f"{method} {path}: no Python example"


def test_the_api_doc_documents_no_endpoint_that_does_not_exist() -> None:
    extra = set(api_sections()) - served_endpoints()
    assert not extra, f"docs/API.md documents endpoints the gateway does not serve: {sorted(extra)}"


@pytest.mark.parametrize("language", ["python", "json"])
def test_api_doc_examples_parse(language: str) -> None:
    blocks = re.findall(rf"```{language}\n(.*?)```", API.read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        if language == "python":
            ast.parse(block)
        else:
            json.loads(block)


def test_readme_describes_the_offline_model_as_the_committed_one_is() -> None:
    """The README's words on llmq's own small GPT-2 (the model every offline run uses): pretrained, its shape,
    parameter count, vocabulary and weight size, read from the committed files (no torch)."""
    import math
    import struct

    model_dir = ROOT / "worker" / "data" / "pretrained_gpt2"
    config = json.loads((model_dir / "config.json").read_text())
    weights = model_dir / "model.safetensors"
    with weights.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    parameters = sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    readme = " ".join((ROOT / "README.md").read_text().split())
    shape = f"{config['n_layer']} layers x {config['n_embd']} wide"
    assert (
        f"**llmq's own small GPT-2** (`worker/data/pretrained_gpt2/`: {shape}, {parameters / 1e6:.1f}M parameters, "
        f"a {config['vocab_size']:,}-token byte-level BPE), which `python -m worker.pretraining` pretrained from "
        "scratch on English the project ships" in readme
    )
    assert f"models/small --pretrained # {shape}, pretrained on shipped English (committed)" in readme
    assert f"The pretrained weights ({weights.stat().st_size / 1e6:.0f} MB," in readme
    assert "random weights" not in readme.split("llmq make-model models/tiny")[0]  # only the tiny one is random
