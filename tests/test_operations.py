"""Docs, connection reuse, secrets and layering, as an operator sees them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx
import jsonschema

from tests.conftest import chat_body, sim_stats
from tests.servers import Server


def test_docs_and_openapi(http: httpx.Client) -> None:
    assert "swagger-ui" in http.get("/docs").text
    document = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models/{model_id}", "/v1/batch/chat/completions"} <= document["paths"].keys()
    schema = {**document, "$ref": "#/components/schemas/ChatCompletionRequest"}
    jsonschema.validate(chat_body(), schema)
    assert not jsonschema.Draft202012Validator(schema).is_valid({"model": "m"})


def test_connections_are_reused(spawn: Callable[..., Server]) -> None:
    backend = spawn("simulator")
    gateway = spawn("gateway", backend.url)
    with httpx.Client(base_url=gateway.url) as http:
        for _ in range(30):
            assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
    stats = sim_stats(backend)
    assert stats["requests"]["/v1/chat/completions"] == 30
    assert stats["connections"] <= 3, "each request opened its own upstream connection"


def test_secret_never_leaks(http: httpx.Client, gateway: Server, simulator: Server) -> None:
    response = http.post("/v1/chat/completions", json=chat_body())
    assert sim_stats(simulator)["last_headers"]["has_authorization"] == "true"
    assert "sk-test-secret-4f9a" not in str(response.headers) + response.text
    assert "sk-test-secret-4f9a" not in http.get("/health").text + http.get("/metrics").text
    assert "sk-test-secret-4f9a" not in gateway.output


def test_framework_free_layers() -> None:
    code = (
        "import sys, inference_core.engine, inference_core.providers.vllm, inference_core.providers.openai;"
        "print([m for m in ('starlette', 'uvicorn') if m in sys.modules])"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
