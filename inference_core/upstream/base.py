"""What every transport offers, and how request paths become URLs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Protocol
from urllib.parse import urljoin


class UpstreamResponse(Protocol):
    """A backend answer whose headers have arrived; the body is read or streamed on demand."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; each wait is bounded by the read timeout."""
        ...

    async def aclose(self) -> None:
        """Drop the connection (or HTTP/2 stream) so the backend sees the client leave."""
        ...


class Transport(ABC):
    """Pooled connections to one backend API root.

    A concrete transport opens its pool in ``start`` and sends one request in ``_send``; this
    class turns a path into a URL and an optional bound into a time limit, in one place.
    """

    def __init__(self, api_root: str, *, idle_connections: int, timeout: float) -> None:
        self.url = Urls(api_root)
        self.idle_connections = idle_connections
        self.timeout = timeout

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        within: float | None = None,
        stream: bool = False,
    ) -> UpstreamResponse:
        """Send a request to ``path`` (relative to the API root) and wait for the answer's headers.

        ``within`` bounds that wait in seconds (default: the transport's read timeout).
        ``stream`` says the body will be read as it arrives and may be abandoned half-way.
        """
        limit = self.timeout if within is None else within
        return await self._send(method, self.url(path), headers, body, limit, stream)

    @abstractmethod
    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, limit: float, stream: bool
    ) -> UpstreamResponse:
        """Send, and return once the headers arrived, within ``limit`` seconds."""


class Urls:
    """Paths relative to the API root as absolute URLs (``../version`` climbs above ``/v1``)."""

    def __init__(self, api_root: str) -> None:
        self._root = api_root.rstrip("/") + "/"
        self._cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        url = self._cache.get(path)
        if url is None:
            url = self._cache[path] = urljoin(self._root, path)
        return url
