"""Keep-alive HTTP/1.1 to the backend with aiohttp, the one place aiohttp is imported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager

import aiohttp

from inference_core.errors import BackendTimeout, BackendUnreachable, BadUpstreamResponse
from inference_core.upstream.base import Transport


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate aiohttp's and asyncio's failures into the gateway's exceptions."""
    try:
        yield
    except TimeoutError as exc:
        raise BackendTimeout("The backend did not answer in time.") from exc
    except aiohttp.ClientPayloadError as exc:
        raise BadUpstreamResponse("The backend's answer was cut short.") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise BackendUnreachable("The backend could not be reached.") from exc


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, timeout: float) -> None:
        self._response = response
        self._timeout = timeout
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        with mapped_errors():
            async with asyncio.timeout(self._timeout):
                return await self._response.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        with mapped_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # close(), not release(): an unfinished body must drop the connection, not drain it.
        self._response.close()


class AiohttpTransport(Transport):
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0, enable_cleanup_closed=True, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, limit: float, stream: bool
    ) -> AiohttpResponse:
        assert self._session is not None, "start() was not awaited"
        with mapped_errors():
            async with asyncio.timeout(limit):
                response = await self._session.request(method, url, headers=headers, data=body)
        return AiohttpResponse(response, limit)
