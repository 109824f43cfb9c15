"""HTTP/2 over TLS to the backend with httpx, the one place httpx is imported.

Used for ``https://`` backends such as OpenAI, where multiplexing many requests over a few TLS
connections saves handshakes; ALPN falls back to HTTP/1.1 for servers without HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager

import httpx

from inference_core.errors import BackendTimeout, BackendUnreachable, BadUpstreamResponse
from inference_core.upstream.base import Transport


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate httpx's and asyncio's failures into the gateway's exceptions."""
    try:
        yield
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise BackendTimeout("The backend did not answer in time.") from exc
    except (httpx.RemoteProtocolError, httpx.DecodingError) as exc:
        raise BadUpstreamResponse("The backend's answer was cut short or malformed.") from exc
    except (httpx.TransportError, OSError) as exc:
        raise BackendUnreachable("The backend could not be reached.") from exc


class HttpxResponse:
    def __init__(self, response: httpx.Response, timeout: float) -> None:
        self._response = response
        self._timeout = timeout
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            with mapped_errors():
                async with asyncio.timeout(self._timeout):
                    return await self._response.aread()
        finally:
            await self._response.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        with mapped_errors():
            async for chunk in self._response.aiter_bytes():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport(Transport):
    _client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            http2=True,
            # The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured), not a bundled one.
            verify=ssl.create_default_context(),
            # No request waits for a connection (admission bounds those in flight); idle ones are capped.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=self.idle_connections),
            timeout=httpx.Timeout(self.timeout),
            trust_env=False,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, limit: float, stream: bool
    ) -> HttpxResponse:
        assert self._client is not None, "start() was not awaited"
        request = self._client.build_request(method, url, headers=headers, content=body)
        with mapped_errors():
            async with asyncio.timeout(limit):
                response = await self._client.send(request, stream=True)
        return HttpxResponse(response, limit)
