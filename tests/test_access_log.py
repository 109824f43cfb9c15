"""One access line per request however the gateway is started, and none when it is turned off.

Each server is stopped before its output is read: lines are written in batches, and all of them
are out once the process has exited.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, free_port, start

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
REQUESTS = 3


def _started(log_dir: Path, backend: Server, command: list[str], port: int, **settings: str) -> Server:
    env = {
        "INFERENCE_BASE_URL": backend.url + "/v1",
        "INFERENCE_MODEL": MODEL,
        "INFERENCE_PORT": str(port),
        "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_DATA_DIR": str(log_dir / f"data-{port}"),
    } | {f"INFERENCE_{name.upper()}": value for name, value in settings.items()}
    return start(command, port=port, env=env, log_dir=log_dir, ready_path="/health/live")


def _access_lines(server: Server) -> tuple[list[dict[str, object]], list[str]]:
    """After ``REQUESTS`` chat requests and a stop: the gateway's access lines, and uvicorn's."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for index in range(REQUESTS):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            response = http.post("/v1/chat/completions", json=body, headers={"x-request-id": f"access-{index}"})
            assert response.status_code == 200, response.text
    server.stop()
    lines = server.output.split("\n")
    ours = [json.loads(line) for line in lines if '"logger":"inference_core.access"' in line]
    theirs = [line for line in lines if "uvicorn.access" in line or '"POST /v1/chat/completions HTTP/1.1"' in line]
    return [line for line in ours if str(line["request_id"]).startswith("access-")], theirs


def _uvicorn(port: int, *flags: str) -> list[str]:
    return ["uvicorn", "inference_core.api:app", "--host", "127.0.0.1", "--port", str(port), *flags]


@pytest.mark.parametrize(
    ("command", "settings", "expected"),
    [
        ("inference-core", {}, REQUESTS),
        ("inference-core", {"access_log": "false"}, 0),
        ("uvicorn", {}, REQUESTS),
        ("uvicorn --no-access-log", {}, 0),
        ("uvicorn", {"access_log": "false"}, 0),
        ("gunicorn --access-logfile -", {}, REQUESTS),
    ],
)
def test_one_access_line_per_request(
    log_dir: Path, simulator: Server, command: str, settings: dict[str, str], expected: int
) -> None:
    port = free_port()
    program, *flags = command.split()
    if program == "inference-core":
        argv = ["inference_core"]
    elif program == "uvicorn":
        argv = _uvicorn(port, *flags)
    else:
        worker = "uvicorn.workers.UvicornWorker"
        argv = ["gunicorn", "-k", worker, "-w", "1", "-b", f"127.0.0.1:{port}", *flags, "inference_core.api:app"]
    server = _started(log_dir, simulator, argv, port, **settings)
    try:
        ours, theirs = _access_lines(server)
    finally:
        server.stop()
    assert theirs == [], theirs
    assert [line["request_id"] for line in ours] == [f"access-{i}" for i in range(expected)]
    assert all(line["status"] == 200 and line["endpoint"] == "/v1/chat/completions" for line in ours)
