"""The /ui dashboard in headless Chromium against a running system: what the pages show once their script ran.

Screenshots land in artifacts/ at the repository root (CI uploads that folder).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.processes import Children, gateway_command, wait_ready
from tests.systems import System, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TRAIN_STEPS = 60
VALIDATION_STEPS = (0, 20, 40, 60)
CHECKPOINT_STEPS = (20, 40, 60)

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it"
)


def chromium(url: str, profile: Path, *extra: str) -> str:
    """Loads url in headless Chromium, lets its script run for 5 s of virtual time; stdout (the DOM with --dump-dom)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dom(url: str, profile: Path) -> str:
    return chromium(url, profile, "--dump-dom")


def screenshot(url: str, profile: Path, name: str, height: int = 900) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    chromium(url, profile, f"--screenshot={path}", f"--window-size=1280,{height}", "--hide-scrollbars")
    assert path.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    return path


class Page:
    """One tab of a DevTools-driven Chromium."""

    def __init__(self, browser: DevTools, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = self.browser.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """The expression's first truthy value, re-evaluated in real time until timeout (then its last value)."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return value

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(exist_ok=True)
        png = self.browser.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(png))


class DevTools:
    """Headless Chromium driven over --remote-debugging-pipe: NUL-terminated JSON, commands on its fd 3, replies
    and events on its fd 4. Needs no websocket client and no driver download."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900", "--hide-scrollbars",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # bash puts the pipe ends where Chromium expects them, whatever fds pytest already holds as 3 and 4.
        redirect = f'exec "$@" 3<&{commands_read} 4>&{replies_write}'
        self.process = subprocess.Popen(
            ["bash", "-c", redirect, "bash", *command],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._last_id = 0
        self._buffer = b""

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._replies)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Sends one command and returns its result (events that arrive meanwhile are dropped)."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._replies], [], [], 30)
                chunk = os.read(self._replies, 1 << 16) if ready else b""
                if not chunk:
                    raise RuntimeError(f"no answer from Chromium to {method}")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def open(self, url: str) -> Page:
        """A new tab loading url."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        return Page(self, self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return tmp_path / "chromium-profile"


def generation_job(system: System, body: dict[str, Any]) -> dict[str, Any]:
    job = httpx.post(f"{system.base_url}/v1/generations", json=body, timeout=10).json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{system.base_url}/v1/generations/{job['id']}", params={"wait": 10}, timeout=20).json()
        if job["status"] == "succeeded":
            return dict(job)
    raise AssertionError(f"generation job did not succeed: {job}")


def train_loss(step: int) -> float:
    """A plausible falling loss curve with a little noise."""
    return 1.2 + 1.9 * math.exp(-step / 14) + 0.06 * math.sin(step * 1.7)


def val_loss(step: int) -> float:
    return 1.45 + 1.8 * math.exp(-step / 16)


SAMPLE = {"prompt": "Name a primary colour.", "reference": "Blue.", "fine_tuned": "Red.", "base": "the the the"}


@pytest.fixture(scope="module")
def fine_tune(production_system: System, postgres_url: str) -> str:
    """A finished fine-tune written straight into the database, as a train worker would have left it."""
    from sqlalchemy.orm import Session

    from shared.db import make_engine
    from shared.fine_tuning import Hyperparameters
    from shared.models import Checkpoint, Job, JobEvent, new_id, utcnow

    job_id = new_id("ftjob")
    base = production_system.env["LLMQ_BASE_MODEL"]
    model = f"ft:tiny-gpt2:demo:{job_id}"
    start = utcnow() - timedelta(minutes=12)

    def at(step: float) -> datetime:
        return start + timedelta(seconds=10 + step * 9.5)

    def event(step: float, message: str, data: dict[str, Any] | None = None, type_: str = "metrics") -> JobEvent:
        return JobEvent(
            job_id=job_id, attempt=1, created_at=at(step), level="info", type=type_, message=message, data=data
        )

    hp = Hyperparameters(n_epochs=2, batch_size=8, eval_every_steps=20, save_every_steps=20).resolved().model_dump()
    metrics = {"train_loss": 1.71, "val_loss": 1.52, "base_val_loss": 3.31, "trained_tokens": 61440, "steps": 60}
    params = {"training_file": "file-alpaca-sample", "validation_file": None, "dataset": None, "suffix": "demo"}
    job = Job(
        id=job_id,
        kind="train",
        status="succeeded",
        model=base,
        base_model=base,
        params=params | {"seed": 7, "metadata": None, "hyperparameters": hp},
        result={
            "fine_tuned_model": model,
            "trained_tokens": 61440,
            "metrics": metrics,
            "result_files": [],
            "samples": [SAMPLE],
        },
        attempt=1,
        max_attempts=3,
        worker="trainer:1",
        created_at=at(-1),
        started_at=at(0),
        finished_at=at(TRAIN_STEPS + 1),
    )
    events = [
        event(-1, "Created fine-tuning job", type_="message"),
        event(0, "Validation loss of the base model: 3.3100", {"step": 0, "base_val_loss": 3.31}),
    ]
    for step in range(1, TRAIN_STEPS + 1):
        loss = train_loss(step)
        figures = {"step": step, "total_steps": TRAIN_STEPS, "train_loss": loss,
                   "learning_rate": 2e-4 * (1 - step / TRAIN_STEPS), "tokens_per_second": 900.0 + step}  # fmt: skip
        events.append(event(step, f"Step {step}/{TRAIN_STEPS}: training loss={loss:.4f}", figures))
        if step in VALIDATION_STEPS:
            message = f"Step {step}: validation loss={val_loss(step):.4f}"
            events.append(event(step, message, {"step": step, "val_loss": val_loss(step)}))
    events.append(event(TRAIN_STEPS + 1, f"New fine-tuned model created: {model}", type_="message"))
    checkpoints = [
        Checkpoint(
            id=new_id("ftckpt"),
            job_id=job_id,
            step=step,
            path=f"jobs/{job_id}/checkpoints/checkpoint-{step}",
            metrics={"step": step, "train_loss": train_loss(step), "val_loss": val_loss(step)},
            created_at=at(step),
        )
        for step in CHECKPOINT_STEPS
    ]
    engine = make_engine(postgres_url)
    with Session(engine) as session:
        session.add(job)
        session.flush()
        session.add_all([*events, *checkpoints])
        session.commit()
    engine.dispose()
    return job_id


@needs_chromium
def test_jobs_page_lists_jobs_with_their_live_status(production_system: System, profile: Path, fine_tune: str) -> None:
    too_long = {"prompt": "word " * 3000, "max_tokens": 4}
    failed = httpx.post(f"{production_system.base_url}/v1/generations", json=too_long, timeout=10).json()
    job = generation_job(production_system, {"prompt": "The jobs page", "max_tokens": 4, "temperature": 0})
    html = dom(f"{production_system.base_url}/ui/jobs", profile)
    row = re.search(rf'<tr data-job="{job["id"]}">(.*?)</tr>', html, re.S)
    assert row is not None, "the job is not in the table"
    assert 'class="badge succeeded"' in row.group(1)
    row = re.search(rf'<tr data-job="{failed["id"]}">(.*?)</tr>', html, re.S)
    assert row is not None and 'class="badge failed"' in row.group(1)
    assert "context_length_exceeded: " in row.group(1)
    assert "live · updated" in html
    trains = dom(f"{production_system.base_url}/ui/jobs?kind=train", profile)  # the filter, as a link sets it
    assert f'href="/ui/fine-tunes/{fine_tune}"' in trains and job["id"] not in trains
    screenshot(f"{production_system.base_url}/ui/jobs", profile, "dashboard-jobs.png")


@needs_chromium
def test_fine_tune_page_draws_train_and_validation_loss_with_events_and_checkpoints(
    production_system: System, profile: Path, fine_tune: str
) -> None:
    url = f"{production_system.base_url}/ui/fine-tunes/{fine_tune}"
    html = dom(url, profile)
    assert '<svg viewBox="0 0 760 320" class="line-chart loss-chart"' in html
    assert '<svg viewBox="0 0 380 220" class="line-chart small" role="img" aria-label="Learning rate by step">' in html
    assert 'aria-label="Training tokens per second by step"' in html
    assert f'<g class="series learning-rate" data-points="{TRAIN_STEPS}">' in html
    assert f'<g class="series throughput" data-points="{TRAIN_STEPS}">' in html
    assert f'<g class="series train" data-points="{TRAIN_STEPS}">' in html
    assert f'<g class="series validation" data-points="{len(VALIDATION_STEPS)}">' in html
    assert html.count('<line class="checkpoint"') == len(CHECKPOINT_STEPS)
    for step in CHECKPOINT_STEPS:
        assert f"{fine_tune}:ckpt-step-{step}" in html
    assert f"Step {TRAIN_STEPS}/{TRAIN_STEPS}: training loss=" in html  # the events list
    assert "Validation loss of the base model: 3.3100" in html
    assert "<h2>Sample answers</h2>" in html
    assert '<tr class="sample"><td class="pre">Name a primary colour.</td><td class="pre fine-tuned">Red.</td>' in html
    assert 'class="badge succeeded"' in html
    assert "train 1.7100 · validation 1.5200 (base 3.3100)" in html
    assert ">Delete model</button>" in html and ">Export</button>" in html and ">Pause</button>" not in html
    screenshot(url, profile, "dashboard-fine-tune.png", height=1300)
    listing = dom(f"{production_system.base_url}/ui/fine-tunes", profile)
    assert f'<a href="/ui/fine-tunes/{fine_tune}" class="mono">{fine_tune}</a>' in listing
    assert f"ft:tiny-gpt2:demo:{fine_tune}" in listing


@needs_chromium
def test_playground_streams_a_prompt_on_a_model_from_the_models_list(production_system: System, profile: Path) -> None:
    base = production_system.env["LLMQ_BASE_MODEL"]
    query = httpx.QueryParams(model=base, prompt="Once upon a time", max_tokens=8, temperature=0, template="raw", run=1)
    expected = httpx.post(
        f"{production_system.base_url}/v1/completions",
        json={"model": base, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["text"]
    # Virtual time cannot wait for a streamed body, so this page is driven in real time over DevTools.
    with DevTools(profile) as browser:
        page = browser.open(f"{production_system.base_url}/ui/playground?{query}")
        done = page.wait_for("document.getElementById('run-status')?.dataset.done")
        html = page.evaluate("document.documentElement.outerHTML")
        assert done == "true", html[-3000:]
        assert page.evaluate("document.getElementById('output').textContent") == expected
        page.screenshot(ARTIFACTS / "dashboard-playground.png")
    assert f'<option value="{base}" selected="">' in html
    assert "8 completion tokens" in html


@needs_chromium
def test_playground_can_wait_for_the_whole_completion(production_system: System, profile: Path) -> None:
    base = production_system.env["LLMQ_BASE_MODEL"]
    query = httpx.QueryParams(model=base, prompt="Hello", max_tokens=4, temperature=0, template="raw", stream=0, run=1)
    html = dom(f"{production_system.base_url}/ui/playground?{query}", profile)
    status = re.search(r'<p id="run-status" class="muted" data-done="(\w+)">(.*?)</p>', html, re.S)
    assert status is not None and status.group(1) == "true", html[-3000:]
    assert "4 completion tokens" in status.group(2)


@needs_chromium
def test_playground_chat_mode_runs_two_models_side_by_side_on_the_same_conversation(
    production_system: System, profile: Path
) -> None:
    base = production_system.env["LLMQ_BASE_MODEL"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = httpx.post(
        f"{production_system.base_url}/v1/chat/completions",
        json={"model": base, "messages": messages, "max_tokens": 6, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    query = httpx.QueryParams(
        model=base, compare=base, mode="chat", system="Be brief.", prompt="Name a colour.", max_tokens=6,
        temperature=0, stream=0, run=1,
    )  # fmt: skip
    html = dom(f"{production_system.base_url}/ui/playground?{query}", profile)
    status = re.search(r'<p id="run-status" class="muted" data-done="(\w+)">', html)
    assert status is not None and status.group(1) == "true", html[-3000:]
    answer = f'<p class="turn assistant"><b>Model: </b>{escape(expected)}</p>'
    assert html.count(answer) == 2, html[-3000:]  # one column per model, the same conversation in each
    assert html.count('<p class="turn user"><b>You: </b>Name a colour.</p>') == 2


@needs_chromium
def test_generation_page_shows_prompts_and_outputs(production_system: System, profile: Path) -> None:
    job = generation_job(production_system, {"prompts": ["First <b>prompt</b>", "Second"], "max_tokens": 4})
    html = dom(f"{production_system.base_url}/ui/generations/{job['id']}", profile)
    assert "First &lt;b&gt;prompt&lt;/b&gt;" in html  # text, never markup
    for output in job["outputs"]:
        assert f'<pre class="completion">{escape(output["text"])}</pre>' in html


def escape(text: str) -> str:
    """Text as Chromium serialises it inside an element."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\u00a0", "&nbsp;")


@pytest.fixture
def keyed_gateway(production_system: System, tmp_path: Path) -> Iterator[str]:
    """A second gateway on the same database that requires API keys."""
    port = free_port()
    env = {**production_system.env, "LLMQ_REQUIRE_API_KEYS": "true", "LLMQ_GATEWAY_RUNS_REAPER": "false"}
    children = Children(env=env, log_dir=tmp_path / "logs")
    children.start("gateway", gateway_command("127.0.0.1", port))
    try:
        wait_ready(f"http://127.0.0.1:{port}", children)
        yield f"http://127.0.0.1:{port}"
    finally:
        children.stop_all()


@needs_chromium
def test_dashboard_asks_for_an_api_key_when_the_gateway_requires_one(keyed_gateway: str, profile: Path) -> None:
    html = dom(f"{keyed_gateway}/ui/jobs", profile)
    assert '<section id="key-panel" class="panel key-panel">' in html  # no longer hidden
    assert "This gateway requires an API key." in html
    assert "401: invalid or missing API key" in html


def test_dashboard_pages_forbid_inline_script_and_other_origins(production_system: System) -> None:
    response = httpx.get(f"{production_system.base_url}/ui/fine-tunes/ftjob-0", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert httpx.get(f"{production_system.base_url}/ui/static/app.js", timeout=10).status_code == 200
    assert httpx.get(f"{production_system.base_url}/ui/static/routes.py", timeout=10).status_code == 404
    assert httpx.get(f"{production_system.base_url}/ui/static/index.html", timeout=10).status_code == 404
    climbing = httpx.get(f"{production_system.base_url}/ui/static/..%2Froutes.py", timeout=10)
    assert "<title>llmq</title>" in climbing.text and "APIRouter" not in climbing.text  # the page, not the file
    redirect = httpx.get(f"{production_system.base_url}/ui", timeout=10)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/jobs"


@needs_chromium
def test_dashboard_sends_the_api_key_kept_in_the_browser(keyed_gateway: str, postgres_url: str, profile: Path) -> None:
    from sqlalchemy.orm import Session

    from shared.api_keys import create_key
    from shared.db import make_engine

    engine = make_engine(postgres_url)
    with Session(engine) as session:
        token = create_key(session, "dashboard-tenant", "ui test").token
    engine.dispose()
    job = httpx.post(
        f"{keyed_gateway}/v1/generations",
        json={"prompt": "Only for this tenant", "max_tokens": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    with DevTools(profile) as browser:
        page = browser.open(f"{keyed_gateway}/ui/jobs")
        page.wait_for("document.getElementById('key-panel').hidden === false")
        page.evaluate(f"localStorage.setItem('llmq.apiKey', {json.dumps(token)}); location.reload(); true")
        rows = page.wait_for("document.querySelectorAll('#jobs tbody tr').length")
        html = page.evaluate("document.getElementById('jobs').innerHTML")
        button = page.evaluate("document.getElementById('key-button').textContent")
    assert rows == 1 and job["id"] in html  # this tenant's job, and no other tenant's
    assert button == "API key ✓"
