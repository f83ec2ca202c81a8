"""What the benchmark scripts measure with: percentiles, load, CPU time of processes, the machine, py-spy."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float, digits: int = 0) -> str:
    """Seconds as milliseconds, for a table cell."""
    return f"{seconds * 1000:.{digits}f}"


def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def log(message: str) -> None:
    """A progress line on stderr, with the time and the load average (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg():.2f}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    """Cores, CPU model (with AVX512-BF16 when the CPU has it) and Python version of this machine."""
    model, flags = "unknown", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    bf16 = " (avx512_bf16)" if "avx512_bf16" in flags else ""
    return f"nproc {len(os.sched_getaffinity(0))}, CPU {model}{bf16}, python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------- CPU time


def cpu_times(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) so far of each process that still runs."""
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots; a process that started in between counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (steal included: the hypervisor gave the core away)."""
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


# ---------------------------------------------------------------------------------------------- py-spy


def start_py_spy(pid: int, output: Path, rate: int, seconds: float | None = None) -> subprocess.Popen[bytes]:
    """py-spy recording raw stacks of pid into output (for seconds, or until stop_py_spy)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    # py-spy installs next to this interpreter (a virtual environment need not be on PATH).
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--nonblocking"]
    if seconds is not None:
        command += ["--duration", str(int(seconds))]
    return subprocess.Popen([*command, "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(spies: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stops the recordings (py-spy writes its output on SIGINT) and waits for them."""
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
