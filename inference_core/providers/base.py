"""What a provider is: a pure translator between the OpenAI API we serve and one backend's API.

A provider opens no sockets and knows no HTTP routes. It turns a client's payload into the
payload its backend wants, and the backend's failures into OpenAI errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from inference_core.endpoints import Endpoint
from inference_core.errors import UpstreamStatusError

Payload = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Translation:
    """A payload ready for the backend, and the client's parameters left out of it."""

    payload: Payload
    changed: bool
    dropped: tuple[str, ...] = ()


class Provider(Protocol):
    """One backend dialect. ``translate`` may raise ``InvalidRequest`` for what it cannot express."""

    name: str
    #: GET path (relative to the API root) whose answer ``learn`` reads once, or None.
    discovery_path: str | None
    #: GET path that answers 2xx while the backend is up.
    health_path: str
    #: The backend's version, once discovery has learnt it.
    version: str | None

    def learn(self, body: bytes) -> None: ...

    def translate(self, endpoint: Endpoint, payload: Payload) -> Translation:
        """The body for the backend; endpoints outside ``endpoints.OPENAI`` pass through untouched."""
        ...

    def classify_error(self, status: int, body: bytes) -> UpstreamStatusError: ...


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` word for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_payload(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI-style body (nested or vLLM's old flat form), if any."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    inner = data.get("error")
    if isinstance(inner, dict):
        return inner
    if data.get("object") == "error" and "message" in data:
        return data
    return None


def normalise_error(status: int, body: bytes) -> UpstreamStatusError:
    """Any backend error body as the OpenAI envelope, keeping its message and ``param``.

    ``code`` becomes a string or null as OpenAI's schema says (vLLM sends the HTTP status there).
    A body that is not an OpenAI error (an HTML page from a proxy, say) is not echoed: it may
    name internal hosts.
    """
    found = error_payload(body) or {}
    message = found.get("message")
    code = found.get("code")
    param = found.get("param")
    return UpstreamStatusError(
        status,
        {
            "message": message if isinstance(message, str) and message else f"The backend answered HTTP {status}.",
            "type": error_type(status),
            "param": param if isinstance(param, str) else None,
            "code": code if isinstance(code, str) else None,
        },
    )
