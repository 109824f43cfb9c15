"""Gateway keys, CORS, and secrets that never leave the gateway."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import chat_body, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server

Spawn = Callable[..., Server]
BACKEND_KEY = "sk-backend-7c1e"
CLIENT_KEYS = ("gw-key-one-93ab", "gw-key-two-5d20")


@pytest.fixture
def guarded(spawn: Spawn, simulator: Server) -> Server:
    return spawn("gateway", simulator.url, gateway_api_keys=",".join(CLIENT_KEYS), api_key=BACKEND_KEY)


def _chat(gateway: Server, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers)


@pytest.mark.parametrize("key", [None, "wrong", CLIENT_KEYS[0] + "x", CLIENT_KEYS[0][:-1]])
def test_missing_or_wrong_key_is_401(guarded: Server, schemas: OpenAISchemas, key: str | None) -> None:
    response = _chat(guarded, key)
    assert response.status_code == 401
    schemas.validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["x-should-retry"] == "false" and response.headers["www-authenticate"] == "Bearer"


def test_any_configured_key_works_and_is_not_forwarded(guarded: Server, simulator: Server) -> None:
    for key in CLIENT_KEYS:
        assert _chat(guarded, key).status_code == 200
        sent = sim_stats(simulator)["last_headers"]["authorization_sha256"]
        assert sent == hashlib.sha256(f"Bearer {BACKEND_KEY}".encode()).hexdigest()


def test_sdk_sees_authentication_error(guarded: Server) -> None:
    with (
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.models.list()
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=CLIENT_KEYS[1], max_retries=0) as sdk:
        assert sdk.models.list().data


def test_keys_from_a_file(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team a\nfile-key-1\n\nfile-key-2  # team b\n")
    gateway = spawn("gateway", simulator.url, gateway_api_keys=f"@{keys}")
    assert _chat(gateway, "file-key-2").status_code == 200
    assert _chat(gateway, "# team a").status_code == 401


def test_probes_and_metrics_stay_open(guarded: Server) -> None:
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert httpx.get(guarded.url + path).status_code == 200


def test_cors_off_by_default_and_configurable(gateway: Server, spawn: Spawn, simulator: Server) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    assert (
        "access-control-allow-origin"
        not in httpx.options(gateway.url + "/v1/chat/completions", headers=preflight).headers
    )
    open_gateway = spawn("gateway", simulator.url, cors_origins="https://app.example", gateway_api_keys="k1")
    response = httpx.options(open_gateway.url + "/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_no_secret_leaves_the_gateway(guarded: Server, simulator: Server) -> None:
    secrets = [BACKEND_KEY, *CLIENT_KEYS]
    seen = []
    for key in (None, "wrong-key-3f", CLIENT_KEYS[0]):
        seen.append(_chat(guarded, key))
    headers = {"authorization": f"Bearer {CLIENT_KEYS[1]}"}
    seen.append(
        httpx.post(guarded.url + "/v1/chat/completions", json=chat_body(sim_fault="status=500"), headers=headers)
    )
    seen.append(httpx.post(guarded.url + "/v1/chat/completions", content=b"{", headers=headers))
    seen += [httpx.get(guarded.url + path) for path in ("/health", "/metrics", "/nope")]
    backend = simulator.url.removeprefix("http://")
    for response in seen:
        exposed = response.text + str(response.headers)
        assert not any(secret in exposed for secret in secrets)
        assert backend not in str(response.headers)
    assert not any(secret in guarded.output for secret in secrets)
    assert "wrong-key-3f" not in guarded.output
