"""Real servers for the tests: the simulator and the gateway, each a subprocess on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

STARTUP_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running server process; ``output`` holds what it printed once it has stopped."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start(
    args: list[str],
    *,
    port: int,
    env: dict[str, str] | None,
    log_dir: Path,
    ready_path: str,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,
) -> Server:
    """Run ``python -m ARGS`` and wait until ``ready_path`` answers."""
    log_path = log_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    full_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"{scheme}://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.output}")
        try:
            httpx.get(server.url + ready_path, timeout=1.0, verify=verify)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not start:\n{server.output}")


def start_simulator(log_dir: Path, *args: str, port: int | None = None) -> Server:
    port = port or free_port()
    return start(
        ["inference_core", "simulate", "--port", str(port), *args],
        port=port,
        env=None,
        log_dir=log_dir,
        ready_path="/health",
    )


def start_gateway(log_dir: Path, backend_url: str, env: dict[str, str] | None = None, **settings: str) -> Server:
    """A gateway in front of ``backend_url`` (several: comma-separated); ``settings`` are INFERENCE_* variables."""
    port = free_port()
    env = {
        **(env or {}),
        "INFERENCE_BASE_URL": ",".join(url + "/v1" for url in backend_url.split(",")),
        "INFERENCE_MODEL": "meta-llama/Meta-Llama-3-8B-Instruct",
        "INFERENCE_PORT": str(port),
        "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_DATA_DIR": str(log_dir / f"data-{port}"),
    }
    env.update({f"INFERENCE_{name.upper()}": value for name, value in settings.items()})
    return start(["inference_core"], port=port, env=env, log_dir=log_dir, ready_path="/health/live")


def start_fleet(log_dir: Path, config: Path, env: dict[str, str] | None = None, **settings: str) -> Server:
    """A gateway configured by the file ``config`` (``settings`` are INFERENCE_* variables on top)."""
    port = free_port()
    env = {
        **(env or {}),
        "INFERENCE_CONFIG": str(config),
        "INFERENCE_PORT": str(port),
        "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_DATA_DIR": str(log_dir / f"data-{port}"),
    }
    env.update({f"INFERENCE_{name.upper()}": value for name, value in settings.items()})
    return start(["inference_core"], port=port, env=env, log_dir=log_dir, ready_path="/health/live")


def until(check: Callable[[], T], what: str, *, seconds: float = 30.0) -> T:
    """Poll ``check`` until it returns something true, and return that; fail with ``what`` after ``seconds``.

    For state a test must see before it goes on (a request queued, a line logged): the deadline
    only bounds a test that would otherwise hang, it is never what the test measures.
    """
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return result


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``, at the server's /metrics (0: none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@contextlib.contextmanager
def held(
    server: Server, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
) -> Iterator[socket.socket]:
    """A request sent on a socket of its own whose answer is never read.

    The request lasts until the socket is closed (``close()``, or the end of the block): the
    server sees its client leave. Give it a body the backend takes long over (a stream with
    ``sim_fault="ttft=60"``) to hold a slot for exactly as long as a test needs it.
    """
    url = httpx.URL(server.url)
    payload = json.dumps(body).encode()
    head = {"host": f"{url.host}:{url.port}", "content-type": "application/json", "content-length": str(len(payload))}
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in (head | (headers or {})).items())]
    sock = socket.create_connection((url.host, url.port))
    with sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
        yield sock
