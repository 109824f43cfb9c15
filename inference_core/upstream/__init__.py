"""The transport: pooled connections to the backend, behind one small protocol.

Plain ``http://`` backends (vLLM) get keep-alive HTTP/1.1 from a purpose-built client: measured
in ``bench/upstream_clients.py``, it costs a fraction of aiohttp's or httpx's CPU per request. ``https://``
backends (OpenAI) get HTTP/2 through httpx for whole-body calls, negotiated by ALPN, so many
requests share a few TLS connections. Streams to them still go over HTTP/1.1: httpcore cannot
cancel one HTTP/2 stream (it sends no RST_STREAM), and a client that leaves must stop the
backend's generation at once, which closing an HTTP/1.1 connection does.
"""

from __future__ import annotations

from collections.abc import Mapping

from inference_core.upstream.base import Transport, UpstreamResponse
from inference_core.upstream.http1 import HTTP1Transport
from inference_core.upstream.http2 import HttpxTransport


class SplitTransport(Transport):
    """HTTP/2 for whole bodies, HTTP/1.1 for streams, to one ``https://`` backend."""

    def __init__(self, api_root: str, *, idle_connections: int, timeout: float) -> None:
        super().__init__(api_root, idle_connections=idle_connections, timeout=timeout)
        self._whole = HttpxTransport(api_root, idle_connections=idle_connections, timeout=timeout)
        self._streams = HTTP1Transport(api_root, idle_connections=idle_connections, timeout=timeout)

    async def start(self) -> None:
        await self._whole.start()
        await self._streams.start()

    async def aclose(self) -> None:
        await self._whole.aclose()
        await self._streams.aclose()

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, limit: float, stream: bool
    ) -> UpstreamResponse:
        transport: Transport = self._streams if stream else self._whole
        return await transport._send(method, url, headers, body, limit, stream)


def create_transport(api_root: str, *, idle_connections: int, timeout: float) -> Transport:
    kind = SplitTransport if api_root.startswith("https:") else HTTP1Transport
    return kind(api_root, idle_connections=idle_connections, timeout=timeout)


__all__ = ["Transport", "UpstreamResponse", "create_transport"]
