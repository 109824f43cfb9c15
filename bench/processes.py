"""Starting and measuring the processes a benchmark runs (simulator, gateway, peers), from /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
CACHE = Path.home() / ".cache/inference-core"
ROUTER_VENV = Path(os.environ.get("BENCH_ROUTER_VENV", CACHE / "router-venv"))


def percentile(values: list[float], q: float) -> float:
    """The value below which a fraction ``q`` of ``values`` lies (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(
    command: list[str | Path],
    ready: str,
    *,
    env: dict[str, str] | None = None,
    core: int | None = None,
    log: IO[bytes] | int = subprocess.DEVNULL,
    within: float = 60,
) -> subprocess.Popen[bytes]:
    """Run ``command`` (pinned to ``core`` if given) and return once GET ``ready`` answers 2xx."""
    pin: list[str | Path] = ["taskset", "-c", str(core)] if core is not None else []
    process = subprocess.Popen([*pin, *command], env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(ready, timeout=1).is_success:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"{command[0]} did not start (no answer at {ready})")


def start(args: list[str], env: dict[str, str], ready: str, *, core: int | None = None) -> subprocess.Popen[bytes]:
    """``python -m inference_core ARGS``, once ``ready`` answers."""
    return spawn([sys.executable, "-m", "inference_core", *args], ready, env=env, core=core)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def gateway_settings(backend_port: int, port: int, **extra: str) -> dict[str, str]:
    """The environment of a quiet gateway on ``port`` in front of a simulator on ``backend_port``."""
    return {
        "INFERENCE_BASE_URL": f"http://127.0.0.1:{backend_port}/v1",
        "INFERENCE_MODEL": MODEL,
        "INFERENCE_PORT": str(port),
        "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_LOG_LEVEL": "warning",
        **{f"INFERENCE_{name.upper()}": value for name, value in extra.items()},
    }


def installed(venv: Path, requirement: str, program: str) -> Path:
    """``program`` from PyPI's ``requirement``, installed into a venv of its own on first use."""
    binary = venv / "bin" / program
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([venv / "bin/pip", "install", "-q", requirement], check=True)
    return binary


def router_binary() -> Path:
    """vLLM's Rust router from PyPI."""
    return installed(ROUTER_VENV, "vllm-router", "vllm-router")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server's workers count as the server)."""
    found = [pid]
    for member in found:
        for task in Path(f"/proc/{member}/task").glob("*"):
            try:
                found += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants."""
    total = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """The largest resident set ``pid`` and its descendants have had, summed."""
    return sum(_status_kb(member, "VmHWM") for member in tree(pid)) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
