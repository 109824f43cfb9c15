"""Session-wide servers: a vLLM-mode simulator with a gateway in front, and the same for OpenAI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.openai_schemas import OpenAISchemas
from tests.servers import Server, start_fleet, start_gateway, start_simulator

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
LORA = "sql-lora"
#: Retries that keep failure tests quick; test_engine checks real backoff on its own gateways.
FAST_RETRIES = {"retry_base_delay": "0.01", "retry_max_delay": "0.05"}


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def schemas() -> OpenAISchemas:
    return OpenAISchemas()


@pytest.fixture(scope="session")
def simulator(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir, "--lora", LORA)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(log_dir: Path, simulator: Server) -> Iterator[Server]:
    server = start_gateway(log_dir, simulator.url, api_key="sk-test-secret-4f9a", **FAST_RETRIES)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openai_simulator(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir, "--mode", "openai", "--model", "gpt-4o")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openai_gateway(log_dir: Path, openai_simulator: Server) -> Iterator[Server]:
    server = start_gateway(log_dir, openai_simulator.url, provider_type="openai", model="gpt-4o", **FAST_RETRIES)
    yield server
    server.stop()


@pytest.fixture
def spawn(log_dir: Path) -> Iterator[Callable[..., Server]]:
    """Start extra gateways or simulators for one test; all are stopped after it."""
    started: list[Server] = []

    def run(kind: str, *args: str, **settings: str) -> Server:
        if kind == "simulator":
            server = start_simulator(log_dir, *args)
        else:
            server = start_gateway(log_dir, *args, **(FAST_RETRIES | settings))
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


Configured = Callable[..., Server]


@pytest.fixture
def configured(log_dir: Path, tmp_path: Path) -> Iterator[Configured]:
    """Start gateways from a configuration file's text (``env``: variables it reads); stopped after the test."""
    started: list[Server] = []

    def run(text: str, env: dict[str, str] | None = None, **settings: str) -> Server:
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(text)
        server = start_fleet(log_dir, path, env=env, **(FAST_RETRIES | settings))
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


@pytest.fixture
def http(gateway: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture
def client(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


SdkFor = Callable[[Server], openai.OpenAI]


@pytest.fixture
def sdk_for() -> Iterator[SdkFor]:
    """OpenAI SDK clients for any gateway, closed after the test."""
    made: list[openai.OpenAI] = []

    def make(server: Server) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0))
        return made[-1]

    yield make
    for sdk in made:
        sdk.close()


def sim_stats(simulator: Server) -> dict[str, Any]:
    return httpx.get(simulator.url + "/_sim/stats").json()


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, **extra}
