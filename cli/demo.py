"""`llmq demo`: the whole system on the embedded default, one generation job, end to end."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cli.processes import Children, gateway_command, wait_ready, worker_command
from client import TERMINAL, LlmqClient
from shared.migrate import upgrade
from shared.prompts import alpaca_prompt
from shared.settings import Settings

DEMO_PROMPTS = [
    alpaca_prompt("Give three tips for staying healthy."),
    alpaca_prompt("Reverse the following list of words.", "red blue green"),
    "The quick brown fox",
]


def hub_reachable(model: str, timeout: float = 5.0) -> bool:
    """True when the model hub answers for this model id within timeout seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from huggingface_hub import model_info

        model_info(model, timeout=timeout)
        return True
    except Exception:
        return False


def choose_model(settings: Settings, console: Console) -> str:
    """The configured base model, or the small local GPT-2 when the hub cannot be reached."""
    if Path(settings.base_model).is_dir() or hub_reachable(settings.base_model):
        return settings.base_model
    from worker.model_factory import build_tiny_gpt2

    path = build_tiny_gpt2(settings.data_dir.resolve() / "models" / "tiny-gpt2")
    console.print(f"[yellow]model hub unreachable: using the small local GPT-2 at {path}[/yellow]", soft_wrap=True)
    return str(path)


def run_demo(settings: Settings, console: Console) -> int:
    """Starts gateway and generate worker, runs one job, prints its outputs, stops them; exit code."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    model = choose_model(settings, console)
    env = {**os.environ, "LLMQ_BASE_MODEL": model, "LLMQ_DATA_DIR": str(settings.data_dir.resolve())}
    os.environ.update(env)
    upgrade(settings.database_url)
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    children = Children(env=env, log_dir=settings.data_dir / "logs")
    try:
        console.print(
            f"starting gateway on {base_url} and a generate worker (logs in {children.log_dir})", soft_wrap=True
        )
        children.start("gateway", gateway_command(settings.api_host, settings.api_port))
        children.start("worker-generate", worker_command("generate"))
        wait_ready(base_url, children)
        started = time.perf_counter()
        with LlmqClient(base_url) as client:
            job = client.create_generation(DEMO_PROMPTS, model=model, max_tokens=32, temperature=0)
            console.print(f"submitted {job.id} ({job.status})")
            while job.status not in TERMINAL:
                children.check_alive()
                job = client.get_generation(job.id, wait=10)
        elapsed = time.perf_counter() - started
        if job.status != "succeeded" or job.outputs is None:
            console.print(f"[red]job {job.status}: {job.error}[/red]")
            return 1
        table = Table("prompt", "output", "finish", "tokens", title=f"{job.id} on {model}")
        for prompt, output in zip(DEMO_PROMPTS, job.outputs, strict=True):
            shown = prompt.split("### Instruction:\n")[-1].split("\n\n### Response:")[0]  # the instruction alone
            table.add_row(shown, output.text, output.finish_reason, str(output.completion_tokens))
        console.print(table)
        console.print(
            f"end to end {elapsed:.2f} s (queued {job.queue_seconds or 0:.3f} s, ran {job.run_seconds or 0:.3f} s)"
        )
        return 0
    finally:
        children.stop_all()
