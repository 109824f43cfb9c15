"""The container image as a user runs it: simulator and gateway in containers, SDK traffic, a drain.

``scripts/test-container`` builds the image and runs this tier. Containers use the host's
network (no bridge), so the tests reach them on loopback ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.postgres import PostgreSQL
from tests.servers import free_port

pytestmark = pytest.mark.container
IMAGE = os.environ.get("INFERENCE_IMAGE", "inference-core:test")
#: The size the image is meant to stay under: 145 MB at first, 153 MB with the clients of Redis and
#: PostgreSQL (on Debian's libpq), YAML and the upload parser.
TARGET_MB = 160


def docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.2)


class Containers:
    """Containers started for one test module, removed at its end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        name = f"inference-core-test-{uuid.uuid4().hex[:8]}"
        flags = [f"--env={key}={value}" for key, value in (env or {}).items()]
        # Read-only, as deploy/kubernetes runs it: the gateway writes nothing to disk.
        docker("run", "--detach", "--network=host", "--read-only", f"--name={name}", *flags, IMAGE, *args)
        self.names.append(name)
        return name


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    started = Containers()
    yield started
    for name in started.names:
        subprocess.run(["docker", "rm", "--force", "--volumes", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def simulator(containers: Containers) -> str:
    port = free_port()
    containers.run("simulate", "--host", "127.0.0.1", "--port", str(port), "--itl", "0.02")
    url = f"http://127.0.0.1:{port}"
    _wait_for(url + "/health")
    return url


def _gateway(containers: Containers, simulator: str, **settings: str) -> tuple[str, str]:
    port = free_port()
    env = {"INFERENCE_BASE_URL": simulator + "/v1", "INFERENCE_MODEL": MODEL, "INFERENCE_PORT": str(port),
           "INFERENCE_HOST": "127.0.0.1", **{f"INFERENCE_{k.upper()}": v for k, v in settings.items()}}  # fmt: skip
    name = containers.run(env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_for(url + "/health/live")
    return name, url


def test_image_is_small_and_runs_as_a_user() -> None:
    size_mb = int(docker("image", "inspect", "--format={{.Size}}", IMAGE)) / 1e6
    print(f"\n{IMAGE}: {size_mb:.0f} MB")
    assert size_mb < TARGET_MB
    config = json.loads(docker("image", "inspect", "--format={{json .Config}}", IMAGE))
    assert config["User"] not in ("", "0", "root")
    assert config["Entrypoint"] == ["inference-core"]
    assert "/health/live" in " ".join(config["Healthcheck"]["Test"])


def test_chat_and_stream_through_the_sdk(containers: Containers, simulator: str) -> None:
    name, url = _gateway(containers, simulator, max_retries="1")
    with openai.OpenAI(base_url=url + "/v1", api_key="unused") as sdk:
        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert answer.object == "chat.completion" and answer.choices[0].message.content
        chunks = list(sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True,
            stream_options={"include_usage": True},
        ))  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert docker("exec", name, "id", "-u") != "0"
    deadline = time.monotonic() + 60
    while docker("inspect", "--format={{.State.Health.Status}}", name) != "healthy":
        assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
        time.sleep(1)


def test_files_are_kept_on_the_image_s_volume(containers: Containers, simulator: str) -> None:
    """The root file system is read-only; uploads (spooled while they arrive) go to the image's data volume."""
    _, url = _gateway(containers, simulator)
    content = b'{"custom_id": "a"}\n' * 200_000  # 3.8 MB: spooled to a temporary file, not held in memory
    with openai.OpenAI(base_url=url + "/v1", api_key="unused") as sdk:
        stored = sdk.files.create(file=("batch.jsonl", content), purpose="batch")
        assert sdk.files.content(stored.id).read() == content


def test_replicas_share_files_and_batches_through_postgresql(containers: Containers, simulator: str) -> None:
    """The image's PostgreSQL driver (psycopg on Debian's libpq): a batch made in one container, read in another."""
    postgres = PostgreSQL()
    postgres.start()
    try:
        database = postgres.database()
        (_, one), (_, two) = (_gateway(containers, simulator, database_url=database) for _ in range(2))
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}  # fmt: skip
        with openai.OpenAI(base_url=one + "/v1", api_key="unused") as first:
            source = first.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
            batch = first.batches.create(
                input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        with openai.OpenAI(base_url=two + "/v1", api_key="unused") as second:
            deadline = time.monotonic() + 60
            while (done := second.batches.retrieve(batch.id)).status != "completed":
                assert time.monotonic() < deadline, done
                time.sleep(0.2)
            assert done.output_file_id is not None
            output = json.loads(second.files.content(done.output_file_id).read())
        assert output["custom_id"] == "a" and output["response"]["status_code"] == 200
    finally:
        postgres.stop()


def test_sigterm_drains_then_exits_zero(containers: Containers, simulator: str) -> None:
    name, url = _gateway(containers, simulator)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        subprocess.run(["docker", "kill", "--signal=TERM", name], check=True, capture_output=True, timeout=30)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", "the stream in flight finished during the drain"
    assert docker("wait", name, timeout=60) == "0"


def test_compose_file_is_valid() -> None:
    """Checked, not run: its Prometheus and Grafana images cannot be pulled here."""
    compose = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "compose.yaml"
    done = subprocess.run(["docker-compose", "-f", str(compose), "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
