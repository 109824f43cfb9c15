"""``./scripts/demo`` behaves like a program: its ports, a clear refusal, and nothing left running."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import chat_body
from tests.servers import free_port

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_serves_on_its_ports_and_stops_both_on_sigterm(tmp_path: Path) -> None:
    port, simulator_port = free_port(), free_port()
    output = tmp_path / "demo.log"
    with output.open("wb") as log:
        demo = subprocess.Popen(
            [DEMO, "--port", str(port), "--simulator-port", str(simulator_port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # the first step reinstalls the package
        while not _listening(port):
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body(), timeout=30)
        assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
        demo.send_signal(signal.SIGTERM)  # to the script alone, as `kill <pid>` does
        assert demo.wait(30) == 143
        assert not _listening(port) and not _listening(simulator_port)
    finally:
        if demo.poll() is None:
            demo.kill()


def test_demo_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [DEMO, "--simulator-port", str(port), "--port", str(free_port())],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"port {port} is already in use" in done.stderr
