"""An https:// backend: whole-body calls share HTTP/2 connections; streams stop when the client leaves."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import SdkFor
from tests.servers import Server, free_port, start, start_gateway, until


@pytest.fixture(scope="module")
def tls_backend(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    certs = tmp_path_factory.mktemp("certs")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(certs / "ca.pem")
    issued = authority.issue_cert("127.0.0.1", "localhost")
    issued.cert_chain_pems[0].write_to_path(certs / "cert.pem")
    issued.private_key_pem.write_to_path(certs / "key.pem")
    port = free_port()
    context = ssl.create_default_context(cafile=certs / "ca.pem")
    server = start(
        ["tests.tls_simulator", str(port), str(certs / "cert.pem"), str(certs / "key.pem")],
        port=port, env=None, log_dir=log_dir, ready_path="/health", scheme="https", verify=context,
    )  # fmt: skip
    yield server, certs / "ca.pem"
    server.stop()


@pytest.fixture(scope="module")
def h2_gateway(log_dir: Path, tls_backend: tuple[Server, Path]) -> Iterator[Server]:
    backend, authority = tls_backend
    # The gateway trusts the system store, which SSL_CERT_FILE points at the test authority.
    trust = {"SSL_CERT_FILE": str(authority)}
    server = start_gateway(log_dir, backend.url, trust, provider_type="openai", model="gpt-4o")
    yield server
    server.stop()


def _stats(backend: Server, authority: Path) -> dict[str, object]:
    context = ssl.create_default_context(cafile=authority)
    return httpx.get(backend.url + "/_sim/stats", verify=context).json()


def test_requests_share_http2_connections(
    h2_gateway: Server, tls_backend: tuple[Server, Path], sdk_for: SdkFor
) -> None:
    backend, authority = tls_backend
    sdk = sdk_for(h2_gateway)
    for _ in range(10):
        completion = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content
    stats = _stats(backend, authority)
    assert stats["http_versions"].get("2", 0) >= 10  # type: ignore[union-attr]
    assert stats["connections"] <= 3  # the stats call itself is one


def test_streams_stop_when_the_client_leaves(h2_gateway: Server, tls_backend: tuple[Server, Path]) -> None:
    backend, authority = tls_backend
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", h2_gateway.url + "/v1/chat/completions", json=body) as response:
        assert [line for line in response.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"
    before = _stats(backend, authority)["streams_aborted"]
    body = {**body, "max_tokens": 200, "sim_fault": "itl=0.1"}
    with httpx.stream("POST", h2_gateway.url + "/v1/chat/completions", json=body) as response:
        next(response.iter_lines())
    # Its 200 tokens take the backend 20 s: stopped within 10 s, it stopped because the client left.
    until(lambda: _stats(backend, authority)["streams_aborted"] != before, "the backend kept generating", seconds=10)
