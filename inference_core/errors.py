"""The gateway's exceptions; each one knows how a client sees it.

    GatewayError                      any failure answered with an OpenAI error body
    ├── InvalidRequest                400: the client's request is wrong
    │   └── UnsupportedParameter      400: the backend cannot honour a parameter
    ├── ModelNotAllowed               403: the caller's key may not use that model
    ├── NotFound                      404: unknown route, model or stored response
    ├── MethodNotAllowed              405
    ├── RequestTimeout                408: the body did not arrive in time
    ├── PayloadTooLarge               413: body over INFERENCE_MAX_BODY_BYTES
    ├── RateLimitExceeded             429 with Retry-After: the key's rpm or tpm is spent
    ├── ClientDisconnected            499: the client left before its answer (never sent)
    ├── Overloaded                    503 with Retry-After: the gateway cannot take more
    │   ├── QueueFull                 the queue holds INFERENCE_QUEUE_SIZE requests already
    │   ├── QueueTimeout              waited longer than INFERENCE_QUEUE_TIMEOUT
    │   ├── Draining                  shutting down: no new work
    │   ├── NoHealthyBackend          every backend replica is down
    │   └── StorageUnavailable        the data directory cannot be written
    └── UpstreamError                 the backend failed us
        ├── BackendUnreachable        502: could not connect, or the connection broke
        ├── BadUpstreamResponse       502: the backend answered something unreadable
        ├── BackendTimeout            504: no answer within INFERENCE_TIMEOUT
        └── UpstreamStatusError       the backend's own error status and (normalised) body

Each class also says whether the client may send the same request again (``client_may_retry``,
rendered as ``x-should-retry: false`` when not): the gateway's overload answers and timeouts may
be retried; a bad request may not, nor may a failure of the backend, which the gateway has
already retried as often as it was allowed to (a client retrying on top multiplies the attempts).

Nothing here imports a web framework or an HTTP client: routes render these, transports raise them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import orjson


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope, serialised."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


_ANTHROPIC_TYPES = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}  # fmt: skip


def anthropic_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    """Anthropic's error envelope (``{"type": "error", "error": {...}}``), for its Messages API routes."""
    error = {"type": anthropic_type(status), "message": message}
    return orjson.dumps({"type": "error", "error": error, "request_id": request_id})


class GatewayError(Exception):
    """A failure the client sees as ``status`` with an OpenAI error body."""

    status: int = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    #: Whether the client may send the same request again (the OpenAI SDK reads ``x-should-retry``).
    client_may_retry: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: Response headers for the client (Retry-After, the engine's accounting).
        self.headers: dict[str, str] = {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)

    @property
    def label(self) -> str:
        """What the client's body says went wrong (its ``code``, else its ``type``), for logs and spans."""
        return self.code or self.type

    def anthropic_body(self, request_id: str | None = None) -> bytes:
        message = self.message or f"The request failed with HTTP {self.status}."
        return anthropic_error_body(self.status, message, request_id)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ResponseNotFound(NotFound):
    code = "response_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    client_may_retry = True


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientDisconnected(GatewayError):
    status = 499
    code = "client_disconnected"
    client_may_retry = True


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimitExceeded(GatewayError):
    """A key's requests or tokens for this window are spent; ``type`` says which, as OpenAI's does."""

    status = 429
    code = "rate_limit_exceeded"
    client_may_retry = True

    def __init__(self, message: str, *, kind: str, retry_after: float) -> None:
        super().__init__(message)
        #: "requests" or "tokens", OpenAI's ``type`` for this error.
        self.kind = kind
        self.wait(retry_after)

    def wait(self, seconds: float) -> None:
        """Tell the client to come back in ``seconds`` (when the window ends)."""
        self.headers["retry-after"] = str(max(1, math.ceil(seconds)))
        self.headers["retry-after-ms"] = str(max(1, round(seconds * 1000)))

    def body(self) -> bytes:
        return error_body(self.message, self.kind, code=self.code)


class Overloaded(GatewayError):
    """The gateway is at capacity; the client should come back shortly."""

    status = 503
    retry_after_seconds = 1
    client_may_retry = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers["retry-after"] = str(self.retry_after_seconds)


class QueueFull(Overloaded):
    code = "queue_full"


class QueueTimeout(Overloaded):
    code = "queue_timeout"


class Draining(Overloaded):
    code = "draining"


class NoHealthyBackend(Overloaded):
    code = "no_healthy_backend"


class StorageUnavailable(Overloaded):
    code = "storage_unavailable"


class UpstreamError(GatewayError):
    """The backend could not give a usable answer, after the gateway's own retries."""


class BackendUnreachable(UpstreamError):
    status = 502
    code = "backend_unreachable"


class BadUpstreamResponse(UpstreamError):
    status = 502
    code = "bad_upstream_response"


class BackendTimeout(UpstreamError):
    status = 504
    code = "backend_timeout"


class UpstreamStatusError(UpstreamError):
    """The backend answered with an error status; its body is relayed as an OpenAI error."""

    def __init__(self, status: int, payload: dict[str, Any], *, raw: bytes | None = None) -> None:
        super().__init__(str(payload.get("message", "")), param=payload.get("param"))
        self.status = status
        self.payload = payload
        self.raw = raw
        #: Seconds the backend asked us to wait (Retry-After), if it did.
        self.retry_after: float | None = None

    def body(self) -> bytes:
        return self.raw if self.raw is not None else orjson.dumps({"error": self.payload})

    @property
    def label(self) -> str:
        payload = self.payload
        if self.raw is not None:  # relayed as the backend wrote it
            try:
                payload = orjson.loads(self.raw)["error"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                payload = {}
        for field in ("code", "type"):
            value = payload.get(field) if isinstance(payload, dict) else None
            if isinstance(value, str) and value:
                return value
        return "server_error" if self.status >= 500 else "invalid_request_error"
