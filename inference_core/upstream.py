"""The transport: pooled HTTP connections to the backend, and the one place aiohttp is imported.

aiohttp's client was chosen by measurement (see ``bench/upstream_clients.py``): relaying through
it costs a fraction of the CPU that httpx needs per request. Its exceptions are mapped to ours
here, so nothing above this module knows which client library is in use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import urljoin

import aiohttp

from inference_core.errors import BackendTimeout, BackendUnreachable, BadUpstreamResponse


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


class UpstreamResponse:
    """A backend answer whose headers have arrived; the body is read or streamed on demand."""

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
        """Body bytes as they arrive; each wait is bounded by the read timeout."""
        with mapped_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    def close(self) -> None:
        """Drop the connection, so the backend sees the client leave and stops generating."""
        self._response.close()

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._response.release()


class Transport:
    """Keep-alive connections to one backend API root."""

    def __init__(self, api_root: str, *, max_connections: int, timeout: float) -> None:
        self._root = api_root.rstrip("/") + "/"
        self._timeout = timeout
        self._urls: dict[str, str] = {}
        self._connector_limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = urljoin(self._root, path)
        return url

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._connector_limit, limit_per_host=0, enable_cleanup_closed=True, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout),
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        within: float | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the answer's headers, within ``within`` seconds (default: the read timeout)."""
        assert self._session is not None, "Transport.start() was not awaited"
        limit = self._timeout if within is None else within
        with mapped_errors():
            async with asyncio.timeout(limit):
                response = await self._session.request(method, self.url(path), headers=headers, data=body)
        return UpstreamResponse(response, limit)
