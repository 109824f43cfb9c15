"""Starting and measuring the processes a benchmark runs (simulator, gateway), from /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], ready: str, *, core: int | None = None) -> subprocess.Popen[bytes]:
    """``python -m inference_core ARGS`` (pinned to ``core`` if given), once ``ready`` answers."""
    pin = ["taskset", "-c", str(core)] if core is not None else []
    process = subprocess.Popen(
        [*pin, sys.executable, "-m", "inference_core", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            httpx.get(ready, timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"{args} did not start")


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
