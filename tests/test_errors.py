"""Everything the gateway answers on failure is an OpenAI error body with the right status."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import MODEL, SdkFor, chat_body, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server, free_port


def _error(response: httpx.Response, schemas: OpenAISchemas, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    schemas.validate("ErrorResponse", response.json())
    return response.json()["error"]


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [{"content": "hi"}]}', "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', "model"),
    ],
)
def test_bad_chat_requests(http: httpx.Client, schemas: OpenAISchemas, content: bytes, param: str | None) -> None:
    error = _error(http.post("/v1/chat/completions", content=content), schemas, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_deeply_nested_json(http: httpx.Client, schemas: OpenAISchemas) -> None:
    _error(http.post("/v1/chat/completions", content=b"[" * 5000 + b"]" * 5000), schemas, 400)


def test_missing_prompt_and_input(http: httpx.Client, schemas: OpenAISchemas) -> None:
    assert _error(http.post("/v1/completions", json={"model": MODEL}), schemas, 400)["param"] == "prompt"
    assert _error(http.post("/v1/embeddings", json={"model": MODEL}), schemas, 400)["param"] == "input"


def test_unknown_route_and_wrong_method(http: httpx.Client, schemas: OpenAISchemas) -> None:
    _error(http.get("/v1/nothing-here"), schemas, 404)
    _error(http.get("/v1/chat/completions"), schemas, 405)


def test_unknown_model_is_the_backends_404(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    error = _error(http.post("/v1/chat/completions", json=chat_body(model="no-such-model")), schemas, 404)
    assert "no-such-model" in str(error["message"])


def test_body_over_the_limit(spawn: Callable[..., Server], simulator: Server, schemas: OpenAISchemas) -> None:
    gateway = spawn("gateway", simulator.url, max_body_bytes="2000")
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    _error(httpx.post(gateway.url + "/v1/chat/completions", json=big), schemas, 413)

    def chunked():  # no content-length: the limit must hold while reading
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"y" * 5000
        yield b'"}]}'

    _error(httpx.post(gateway.url + "/v1/chat/completions", content=chunked()), schemas, 413)
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body()).status_code == 200


def test_backend_unreachable(spawn: Callable[..., Server], schemas: OpenAISchemas, sdk_for: SdkFor) -> None:
    gateway = spawn("gateway", f"http://127.0.0.1:{free_port()}")
    error = _error(httpx.post(gateway.url + "/v1/chat/completions", json=chat_body()), schemas, 502)
    assert error["code"] == "backend_unreachable"
    assert "127.0.0.1" not in str(error["message"])
    sdk = sdk_for(gateway)
    with pytest.raises(openai.InternalServerError):
        sdk.models.list()


def test_backend_too_slow(spawn: Callable[..., Server], simulator: Server, schemas: OpenAISchemas) -> None:
    gateway = spawn("gateway", simulator.url, timeout="0.5")
    error = _error(httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(sim_fault="delay=3")), schemas, 504)
    assert error["code"] == "backend_timeout"
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body()).status_code == 200


def test_malformed_backend_json(http: httpx.Client, schemas: OpenAISchemas) -> None:
    error = _error(http.post("/v1/chat/completions", json=chat_body(sim_fault="malformed")), schemas, 502)
    assert error["code"] == "bad_upstream_response"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_backend_error_status_is_relayed(http: httpx.Client, schemas: OpenAISchemas, status: int) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(sim_fault=f"status={status}"))
    error = _error(response, schemas, status)
    assert error["message"] == f"Simulated failure {status}."


def test_request_id_is_kept_and_forwarded(http: httpx.Client, simulator: Server) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "trace-abc-123"})
    assert response.headers["x-request-id"] == "trace-abc-123"
    assert sim_stats(simulator)["last_headers"]["x-request-id"] == "trace-abc-123"
    fresh = http.post("/v1/chat/completions", json=chat_body())
    assert len(fresh.headers["x-request-id"]) >= 16
    assert sim_stats(simulator)["last_headers"]["x-request-id"] == fresh.headers["x-request-id"]


def test_unsafe_request_id_is_replaced(http: httpx.Client) -> None:
    response = http.get("/health/live", headers={"x-request-id": "bad id\twith spaces"})
    assert response.headers["x-request-id"] != "bad id\twith spaces"
