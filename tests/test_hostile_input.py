"""Hostile values in every request field, against a real gateway process on Postgres (property-based).

The fields are read from the gateway's own OpenAPI schema (every JSON body of every operation, walked down to
its strings, numbers, booleans, lists and maps; every path and query parameter) and from the Alpaca record
fields of an upload, so a field added later is covered without touching this file. Hypothesis sends each a
few generated hostile values: lone surrogates, NUL and other control characters, right-to-left and combining
marks, huge strings, huge and negative numbers, NaN and Infinity, integers of 5,000 digits, nesting 3,000
deep, and values of the wrong JSON type. For each answer:

- never a 5xx; a 4xx carries a JSON error body in the documented shape, and wrote no row;
- values no field may hold (NUL, lone surrogates, the wrong type, non-finite or 5,000-digit numbers, deep
  nesting) are refused; anything else may be accepted only if what was stored reads back (GET answers 200);
- /readyz is still ready and the tenant's list endpoints still answer 200.

Batch input files are walked too: generated files of good and bad lines, each line's fate checked (it runs,
or it is in the error file with its line number; blank lines are skipped).

No worker runs: jobs stay queued and completions give up at once (LLMQ_COMPLETION_TIMEOUT_SECONDS); a batch's
requests are answered through the job state machine by the test. LLMQ_HOSTILE_EXAMPLES sets the examples per
field (default 3: about 40 s on two cores), LLMQ_BATCH_FILE_EXAMPLES the batch files (default 12: about 10 s).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.alpaca import OPTIONAL, REQUIRED
from tests.systems import System, start_system

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("LLMQ_HOSTILE_EXAMPLES", "3"))
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
BASE = "test-base-model"
TENANT = "hostile-tenant"
# A valid body per JSON operation: each field in turn is replaced with a hostile value.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/generations": {"prompt": "Hello"},
    "/v1/completions": {"model": BASE, "prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
    "/v1/fine_tuning/jobs": {"model": BASE},
    # posted as documented, to a job that does not exist: a body that passes validation answers 404
    "/v1/fine_tuning/jobs/{job_id}/export": {"dtype": "float16"},
    "/v1/batches": {
        "input_file_id": "file-none",
        "endpoint": "/v1/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
    },
}
LISTS = ("/v1/jobs", "/v1/fine_tuning/jobs", "/v1/files", "/v1/models", "/v1/batches")


# --- The fields, from the OpenAPI schema --------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One place a hostile value can go: a JSON body path, and whether the value replaces the field, one item
    of its list, one value of its map, or one key of its map."""

    path: str  # the operation
    where: tuple[str, ...]
    slot: str  # value | item | map_value | map_key
    types: frozenset[str]  # JSON types the slot accepts ("integer" also where "number")

    def __str__(self) -> str:
        return f"{self.path}:{'.'.join(self.where)}:{self.slot}"


def _openapi() -> dict[str, Any]:
    from gateway.app import create_app
    from tests.process_settings import reset_caches

    try:
        return create_app().openapi()
    finally:
        reset_caches()


SCHEMA = _openapi()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _options(node: dict[str, Any]) -> list[dict[str, Any]]:
    node = _resolve(node)
    if "anyOf" in node or "oneOf" in node:
        return [option for sub in node.get("anyOf", node.get("oneOf", [])) for option in _options(sub)]
    return [node]


def _type_of(node: dict[str, Any]) -> str:
    if "type" in node:
        return str(node["type"])
    if "enum" in node or "const" in node:
        return "string" if isinstance((node.get("enum") or [node.get("const")])[0], str) else "number"
    return "any"


def _fields(path: str, node: dict[str, Any], where: tuple[str, ...], seen: set[str]) -> Iterator[Field]:
    options = _options(node)
    types = frozenset(_type_of(o) for o in options)
    yield Field(path, where, "value", types)
    for option in options:
        kind = _type_of(option)
        if kind == "object" and "properties" in option:
            if option.get("title") in seen:  # a model met before (e.g. the deprecated hyperparameters)
                continue
            seen.add(option.get("title", ""))
            for name, sub in option["properties"].items():
                yield from _fields(path, sub, (*where, name), seen)
        elif kind == "object":
            values = frozenset(_type_of(o) for o in _options(option.get("additionalProperties", {})))
            yield Field(path, where, "map_value", values)
            yield Field(path, where, "map_key", frozenset({"string"}))
        elif kind == "array":
            items = frozenset(_type_of(o) for o in _options(option.get("items", {})))
            yield Field(path, where, "item", items)


def body_fields() -> list[Field]:
    """Every slot of every JSON request body the gateway documents (a model met twice in one body, walked once)."""
    found = []
    for path, operations in SCHEMA["paths"].items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                assert path in VALID_BODIES, f"a new JSON operation {path}: give it a valid body here"
                seen: set[str] = set()
                for root in _options(content["application/json"]["schema"]):  # an optional body: model or null
                    for name, sub in root.get("properties", {}).items():
                        found += _fields(path, sub, (name,), seen)
    return found


def parameters() -> list[tuple[str, str, str]]:
    """(method, path, parameter) of every path and query parameter the gateway documents."""
    return [
        (method.upper(), path, parameter["name"])
        for path, operations in SCHEMA["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        if parameter["in"] in ("path", "query")
    ]


# --- Hostile values -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is (what json.dumps cannot write: NaN, 5,000-digit integers, deep nesting)."""

    text: str


@dataclass(frozen=True)
class Hostile:
    value: Any
    refuse: bool  # no field may hold it


def _around(middle: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(st.text(max_size=8), middle, st.text(max_size=8)).map("".join)


SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
CONTROL = st.sampled_from([chr(c) for c in (*range(1, 32), 0x7F, 0x85, 0x9B)])
MARKS = st.sampled_from(["\u202e", "\u200f", "\u0301", "\u0336", "\ufeff", "\u2066", "\U0001f600", "\u05d0"])

# Values no field may hold, whatever its type.
UNSTORABLE_TEXT = st.one_of(_around(st.just("\x00")), _around(SURROGATE))
NEVER = st.sampled_from(
    [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("9" * 5000), Raw("[" * 3000 + "]" * 3000)]
)
# Values some field may hold.
MAYBE_TEXT = st.one_of(
    _around(CONTROL),
    _around(MARKS),
    st.text(min_size=1, max_size=3).map(lambda s: s * 50_000),  # huge
    st.just(""),
)
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 10**100]),
    st.floats(allow_nan=False, allow_infinity=False),
)


def hostile(types: frozenset[str]) -> st.SearchStrategy[Hostile]:
    """Hostile values for a slot that accepts these JSON types, each marked with whether it must be refused."""

    def number(value: int | float) -> Hostile:
        if isinstance(value, bool):
            return Hostile(value, "boolean" not in types)
        fits = "number" in types or (isinstance(value, int) and "integer" in types)
        return Hostile(value, not fits and "any" not in types)

    def typed(kind: str, value: Any) -> Hostile:
        return Hostile(value, kind not in types and "any" not in types)

    return st.one_of(
        UNSTORABLE_TEXT.map(lambda s: Hostile(s, True)),
        st.lists(UNSTORABLE_TEXT, min_size=1, max_size=2).map(lambda s: Hostile(s, True)),
        NEVER.map(lambda raw: Hostile(raw, True)),
        MAYBE_TEXT.map(lambda s: typed("string", s)),
        NUMBERS.map(number),
        st.booleans().map(number),
        st.just(None).map(lambda _: Hostile(None, False)),
        st.lists(st.integers(), max_size=2).map(lambda v: typed("array", v)),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2).map(lambda v: typed("object", v)),
    )


def encode(body: Any) -> str:
    """JSON text of a body that may hold Raw values."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {key: mark(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mark(item) for item in value]
        return value

    text = json.dumps(mark(body))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text


def place(body: dict[str, Any], field: Field, value: Any) -> dict[str, Any]:
    """A copy of body with value at the field's slot."""
    body = json.loads(json.dumps(body))
    node = body
    for name in field.where[:-1]:
        node = node.setdefault(name, {})
    last = field.where[-1]
    if field.slot == "value":
        node[last] = value
    elif field.slot == "item":
        node[last] = [value]
    elif field.slot == "map_value":
        node[last] = {"key": value}
    else:
        node[last] = {value: "v"}
    return body


def url_for(path: str, name: str, encoded: str) -> str:
    """The operation's URL with the hostile text as the named parameter (other path parameters: none)."""
    filled = re.sub(r"\{(\w+)\}", lambda m: encoded if m.group(1) == name else "none", path)
    return filled if f"{{{name}}}" in path else f"{filled}?{name}={encoded}"


# --- The gateway --------------------------------------------------------------------------------------------


ROWS = """SELECT (SELECT count(*) FROM jobs WHERE tenant = %(t)s),
                  (SELECT count(*) FROM files WHERE tenant = %(t)s),
                  (SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.tenant = %(t)s)"""


@dataclass
class Target:
    system: System
    client: httpx.Client
    database: psycopg.Connection[Any]  # autocommit: each count sees what the gateway committed

    def rows(self) -> tuple[int, int, int]:
        """The tenant's jobs, files and job events."""
        counts = self.database.execute(ROWS, {"t": TENANT}).fetchone()
        assert counts is not None
        return counts[0], counts[1], counts[2]

    def still_healthy(self) -> None:
        ready = self.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] in ("ok", "degraded"), ready.text  # no workers
        for path in LISTS:
            listed = self.client.get(path)
            assert listed.status_code == 200, f"{path}: {listed.status_code} {listed.text[:500]}"


@pytest.fixture(scope="module")
def target(postgres_url: str, quiet_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    from sqlalchemy.orm import Session

    from shared.api_keys import create_key
    from shared.db import make_engine

    engine = make_engine(postgres_url)
    with Session(engine) as session:
        key = create_key(session, TENANT, "hostile").token
    engine.dispose()
    data = tmp_path_factory.mktemp("hostile")
    env = {
        "LLMQ_DATABASE_URL": postgres_url,
        "LLMQ_BROKER_URL": quiet_redis_url,
        "LLMQ_DATA_DIR": str(data),
        "LLMQ_BASE_MODEL": BASE,
        "LLMQ_REQUIRE_API_KEYS": "true",
        "LLMQ_RATE_LIMIT_PER_MINUTE": "0",
        "LLMQ_MAX_ACTIVE_JOBS_PER_TENANT": "0",
        "LLMQ_COMPLETION_TIMEOUT_SECONDS": "0.05",
        "LLMQ_MAX_WAIT_SECONDS": "0.05",
    }
    system = start_system(env, data / "logs", queues=())
    headers = {"Authorization": f"Bearer {key}"}
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with (
            httpx.Client(base_url=system.base_url, headers=headers, timeout=30) as client,
            psycopg.connect(dsn, autocommit=True) as database,
        ):
            yield Target(system, client, database)
    finally:
        system.children.stop_all()
        log = data / "logs" / "gateway.log"
        if log.exists() and "Traceback" in (text := log.read_text(errors="replace")):
            print(text[-20_000:])  # shown when a test fails


def check_answer(target: Target, response: httpx.Response, before: tuple[int, int, int], refuse: bool) -> None:
    """The properties every answer to a hostile value must have (see the module docstring)."""
    from shared.schemas import ErrorResponse, ValidationErrorResponse

    status = response.status_code
    assert status < 500 or (status == 504 and response.json()["error"]["code"] == "timeout"), response.text[:2000]
    if 400 <= status < 500:
        (ValidationErrorResponse if status in (400, 422) else ErrorResponse).model_validate(response.json())
        assert target.rows() == before, "a refused request wrote a row"
    else:
        assert not refuse, f"accepted a value no field may hold: {status} {response.text[:500]}"
    target.still_healthy()


def check_stored_reads_back(target: Target, path: str, response: httpx.Response) -> None:
    """An accepted request's row answers GET (a completion's job is read as a generation)."""
    if response.status_code == 504:
        job_id = response.json()["detail"].split()[1]
        path = "/v1/generations"
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        return  # a stream's job id is in its chunks; its row is covered by the list endpoints
    else:
        job_id = response.json()["id"]
        path = "/v1/generations" if path == "/v1/completions" else path
    read = target.client.get(f"{path}/{job_id}")
    assert read.status_code == 200, read.text[:500]


# --- The tests ----------------------------------------------------------------------------------------------


def never_held(field: Field) -> list[Any]:
    """Values this slot must refuse, every time: unstorable text, coerced types, unreadable numbers."""
    if field.slot == "map_key":
        return ["k\x00", "k\ud800"]
    values: list[Any] = ["a\x00b", "a\udc80b", ["\ud83d"], Raw("9" * 5000), Raw("NaN")]
    if "any" not in field.types:
        if "string" not in field.types:
            values.append("10")  # "max_tokens": "10"
        if "boolean" not in field.types:
            values.append(True)  # "n": true
        if "integer" in field.types and "number" not in field.types:
            values.append(1.0)
    return values


@pytest.mark.parametrize("field", body_fields(), ids=str)
def test_what_no_field_may_hold_is_refused_in_every_body_field(target: Target, field: Field) -> None:
    """The deterministic half: each value that must be refused, in each slot (the examples below add more)."""
    for value in never_held(field):
        body = place(VALID_BODIES[field.path], field, value)
        before = target.rows()
        response = target.client.post(field.path, content=encode(body), headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, f"{value!r}: {response.status_code} {response.text[:500]}"
        assert response.json()["error"]["message"] and target.rows() == before, repr(value)
    target.still_healthy()


@pytest.mark.parametrize("field", body_fields(), ids=str)
@HOSTILE
@given(data=st.data())
def test_a_hostile_value_in_any_body_field_is_refused_or_stored_readably(
    target: Target, field: Field, data: st.DataObject
) -> None:
    if field.slot == "map_key":  # a key is always text
        keys = st.one_of(UNSTORABLE_TEXT.map(lambda s: Hostile(s, True)), MAYBE_TEXT.map(lambda s: Hostile(s, False)))
        value = data.draw(keys)
    else:
        value = data.draw(hostile(field.types))
    body = place(VALID_BODIES[field.path], field, value.value)
    before = target.rows()
    response = target.client.post(field.path, content=encode(body), headers={"content-type": "application/json"})
    check_answer(target, response, before, value.refuse)
    if response.status_code < 300 or response.status_code == 504:
        check_stored_reads_back(target, field.path, response)


@pytest.mark.parametrize("field", [*REQUIRED, *OPTIONAL])
@HOSTILE
@given(data=st.data())
def test_a_hostile_value_in_any_uploaded_record_field_is_refused_or_stored_readably(
    target: Target, field: str, data: st.DataObject
) -> None:
    value = data.draw(hostile(frozenset({"string", "null"} if field in OPTIONAL else {"string"})))
    record = {"instruction": "Say hi.", "input": "", "output": "Hi."} | {field: value.value}
    before = target.rows()
    files = {"file": ("hostile.jsonl", (encode(record) + "\n").encode("utf-8", "surrogatepass"))}
    response = target.client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    check_answer(target, response, before, value.refuse)
    if response.status_code == 200:
        assert target.client.get(f"/v1/files/{response.json()['id']}").status_code == 200


@pytest.mark.parametrize(("method", "path", "name"), parameters(), ids=lambda p: str(p))
@HOSTILE
@given(data=st.data())
def test_a_hostile_path_or_query_parameter_is_refused_or_harmless(
    target: Target, method: str, path: str, name: str, data: st.DataObject
) -> None:
    text = data.draw(st.one_of(UNSTORABLE_TEXT, _around(CONTROL), MAYBE_TEXT.filter(lambda s: len(s) < 2000)))
    refuse = "\x00" in text or any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)
    encoded = quote(text.encode("utf-8", "surrogatepass"), safe="") or "x"  # a surrogate: invalid UTF-8
    before = target.rows()
    response = target.client.request(method, url_for(path, name, encoded))
    check_answer(target, response, before, refuse)


def test_every_field_of_every_request_model_is_walked() -> None:
    """The walk reaches the fields that once answered 500 or stored what no reader could read."""
    walked = {(f.path, f.where) for f in body_fields()}
    for expected in [
        ("/v1/generations", ("prompts",)),
        ("/v1/generations", ("stop",)),
        ("/v1/completions", ("user",)),
        ("/v1/fine_tuning/jobs", ("metadata",)),
        ("/v1/fine_tuning/jobs", ("suffix",)),
        ("/v1/fine_tuning/jobs", ("dataset", "name")),
        ("/v1/fine_tuning/jobs", ("method", "supervised", "hyperparameters", "target_modules")),
        ("/v1/fine_tuning/jobs", ("method", "supervised", "hyperparameters", "n_epochs")),
    ]:
        assert expected in walked, expected
    assert ("GET", "/v1/jobs", "after") in parameters()


# --- Batch input files --------------------------------------------------------------------------------------
#
# Each example is an input file of generated lines, each of a kind whose fate the rules of gateway.batch_lines
# decide: a good request runs (one job, its answer in the output file); a bad one (not JSON, not UTF-8, no
# custom_id, a custom_id met before, another url or method, an oversized or unstorable body, random bytes)
# goes to the error file with its line number; a blank line is skipped. Every line's fate is checked, and no
# answer is a 5xx.

BATCH_EXAMPLES = int(os.environ.get("LLMQ_BATCH_FILE_EXAMPLES", "12"))
SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@dataclass(frozen=True)
class Fate:
    """What must become of one line: ran (custom_id), refused (code, None for any) or skipped (blank)."""

    outcome: str  # ran | refused | skipped
    custom_id: str | None = None
    code: str | None = None


def _request_line(custom_id: object, prompt: str = "Hi", **change: Any) -> dict[str, Any]:
    body = {"model": BASE, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body} | change


def _line(request: dict[str, Any]) -> bytes:
    return encode(request).encode("utf-8", "surrogatepass")


Line = tuple[bytes, Fate]


def _good(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    return _line(_request_line(fresh, draw(SAFE_TEXT))), Fate("ran", fresh)


def _blank(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    return draw(st.sampled_from([b"", b"   ", b"\t"])), Fate("skipped")


def _truncated(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    whole = _line(_request_line(fresh))
    return whole[: draw(st.integers(1, len(whole) - 1))], Fate("refused", code="invalid_json_line")


def _not_utf8(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"]))
    return _line(_request_line(fresh, "@@")).replace(b"@@", bad), Fate("refused", code="invalid_json_line")


def _no_custom_id(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    custom_id = draw(st.sampled_from([None, "", 7, ["x"], "c" * 513]))
    request = _request_line(custom_id)
    if custom_id is None:
        del request["custom_id"]
    return _line(request), Fate("refused", code="missing_custom_id")


def _hostile_custom_id(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    return _line(_request_line(draw(UNSTORABLE_TEXT) + fresh)), Fate("refused", code="invalid_custom_id")


def _duplicate(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    if not seen:
        return _good(draw, fresh, seen)
    return _line(_request_line(draw(st.sampled_from(seen)))), Fate("refused", code="duplicate_custom_id")


def _other_url(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    url = draw(st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "", "/v1/completions/"]))
    return _line(_request_line(fresh, url=url)), Fate("refused", fresh, "invalid_url")


def _other_method(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    method = draw(st.sampled_from(["GET", "post", None]))
    return _line(_request_line(fresh, method=method)), Fate("refused", fresh, "invalid_method")


def _oversized(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    request = _request_line(fresh)
    request["body"] |= draw(st.sampled_from([{"prompt": "x" * 20_000}, {"max_tokens": 10**9}, {"n": 10**6}]))
    return _line(request), Fate("refused", fresh)


def _unstorable_body(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    return _line(_request_line(fresh, draw(UNSTORABLE_TEXT))), Fate("refused", fresh)


def _random(draw: st.DrawFn, fresh: str, seen: list[str]) -> Line:
    raw = draw(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b))
    return raw, Fate("skipped") if not raw.strip() else Fate("refused")


LINE_KINDS = [_good, _good, _good, _blank, _truncated, _not_utf8, _no_custom_id, _hostile_custom_id, _duplicate,
              _other_url, _other_method, _oversized, _unstorable_body, _random]  # fmt: skip


@st.composite
def batch_input(draw: st.DrawFn) -> list[Line]:
    """An input file's lines, each with its fate."""
    lines: list[Line] = []
    seen: list[str] = []  # the custom_ids of earlier lines that got as far as the duplicate check
    for number in range(1, draw(st.integers(1, 12)) + 1):
        kind = draw(st.sampled_from(LINE_KINDS))
        fresh = f"{draw(SAFE_TEXT)}#{number}"  # unique: no earlier line can hold it
        raw, fate = kind(draw, fresh, seen)
        lines.append((raw, fate))
        if fate.custom_id == fresh:
            seen.append(fresh)
    return lines


@pytest.fixture(scope="module")
def run_jobs(postgres_url: str) -> Iterator[Callable[[list[str]], None]]:
    """Answers queued jobs by id as a worker would (the real state machine), so that their batch can end."""
    from sqlalchemy.orm import sessionmaker

    from shared import job_states
    from shared.db import make_engine
    from shared.job_data import GenerationOutput, GenerationResult, Usage

    engine = make_engine(postgres_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    output = GenerationOutput(index=0, text=" ok", finish_reason="length", prompt_tokens=1, completion_tokens=1)
    result = GenerationResult(outputs=[output], usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))

    def run(ids: list[str]) -> None:
        with sessions() as session:
            for job_id in ids:
                claim = job_states.claim(session, job_id, worker="hostile-test", lease_seconds=30)
                assert claim is not None and job_states.succeed(session, claim, result)

    yield run
    engine.dispose()


@settings(HOSTILE, max_examples=BATCH_EXAMPLES)
@given(lines=batch_input())
def test_every_line_of_a_batch_input_file_runs_or_is_reported_with_its_line_number(
    target: Target, run_jobs: Callable[[list[str]], None], lines: list[Line]
) -> None:
    content = b"".join(raw + b"\n" for raw, _ in lines)
    fates = {number: fate for number, (_, fate) in enumerate(lines, start=1) if fate.outcome != "skipped"}
    uploaded = target.client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", content)})
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions"}
    created = target.client.post("/v1/batches", json=body)
    if not fates:
        assert created.status_code == 400 and created.json()["error"]["code"] == "invalid_input_file", created.text
        return
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    jobs = target.database.execute(
        "SELECT id, batch_line, custom_id FROM jobs WHERE batch_id = %s ORDER BY batch_line", (batch_id,)
    ).fetchall()
    ran = {number: fate.custom_id for number, fate in fates.items() if fate.outcome == "ran"}
    assert {line: custom_id for _, line, custom_id in jobs} == ran
    run_jobs([job_id for job_id, _, _ in jobs])

    batch = target.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": len(fates), "completed": len(ran), "failed": len(fates) - len(ran)}
    output = _jsonl(target, batch["output_file_id"])
    assert sorted(answer["custom_id"] for answer in output) == sorted(ran.values())
    errors = _jsonl(target, batch["error_file_id"])
    refused = {number: fate for number, fate in fates.items() if fate.outcome == "refused"}
    assert [e["error"]["line"] for e in errors] == sorted(refused)  # each bad line once, in order
    for entry in errors:
        fate = refused[entry["error"]["line"]]
        assert entry["response"] is None and entry["error"]["message"]
        assert fate.code is None or entry["error"]["code"] == fate.code, (entry, fate)
        assert fate.custom_id is None or entry["custom_id"] == fate.custom_id, (entry, fate)
    answered = [a["custom_id"] for a in output] + [e["custom_id"] for e in errors if e["custom_id"] is not None]
    assert len(answered) == len(set(answered)), answered  # each custom_id answered once, in one of the files
    target.still_healthy()


def _jsonl(target: Target, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = target.client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200, content.text
    return [json.loads(line) for line in content.text.splitlines()]


if __name__ == "__main__":  # pragma: no cover - how many slots the suite walks
    print(len(body_fields()), "body slots,", len(parameters()), "parameters;", Path(__file__).name)
