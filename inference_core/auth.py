"""Gateway keys: with keys configured (``keys:`` in the file, or ``INFERENCE_GATEWAY_API_KEYS``),
every ``/v1/*`` call needs one of them; the key's tenant goes on with the request.

A key comes as ``Authorization: Bearer`` or, from Anthropic's SDK, as ``x-api-key``; a refusal
on Anthropic's routes takes Anthropic's error shape. Keys are compared in constant time
(see ``engine/tenants.py``). Health and metrics stay open: they are for probes and scrapers on the
cluster network, and say nothing secret. The client's Authorization and x-api-key headers are
never forwarded: the backend's key comes only from configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from inference_core.config import ConfigError
from inference_core.endpoints import ANTHROPIC_PATHS
from inference_core.engine.tenants import Keys, Tenant
from inference_core.errors import InvalidApiKey
from inference_core.observability import record_of

PROTECTED_PREFIX = "/v1/"


def parse_keys(spec: str) -> tuple[bytes, ...]:
    """``key1,key2`` or ``@/path/to/file`` (one key per line, ``#`` starts a comment)."""
    if spec.startswith("@"):
        try:
            text = Path(spec[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"INFERENCE_GATEWAY_API_KEYS: cannot read {spec[1:]} ({exc.strerror})") from None
        keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        keys = [key.strip() for key in spec.split(",")]
    found = tuple(key.encode() for key in keys if key)
    if not found:
        raise ConfigError("INFERENCE_GATEWAY_API_KEYS: no key given (accepts: key1,key2 or @/path/to/keys)")
    return found


class GatewayKeys:
    """ASGI middleware answering 401, in OpenAI's shape, to ``/v1/*`` calls without a valid key.

    ``keys`` gives the keys in force (they change on reload); None leaves the API open.
    """

    def __init__(self, app: ASGIApp, *, keys: Callable[[], Keys | None]) -> None:
        self.app = app
        self.keys = keys

    @staticmethod
    def _presented(scope: Scope) -> bytes:
        """``Authorization: Bearer <key>`` (OpenAI's SDKs) or ``x-api-key: <key>`` (Anthropic's)."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        for name, value in headers:
            if name == b"authorization":
                return value[7:] if value[:7].lower() == b"bearer " else b""
            if name == b"x-api-key":
                return value
        return b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys()
        if keys is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        tenant = keys.authenticate(self._presented(scope))
        if tenant is not None:
            scope["state"]["tenant"] = tenant
            record_of(scope).key = tenant.name
            await self.app(scope, receive, send)
            return
        refused = InvalidApiKey("Invalid or missing API key.")
        body = refused.anthropic_body() if scope["path"] in ANTHROPIC_PATHS else refused.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", b"Bearer"),
            (b"x-should-retry", b"false"),
        ]
        await send({"type": "http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def tenant_of(scope: Scope) -> Tenant | None:
    """The tenant whose key came with the request (None when the gateway has no keys)."""
    tenant: Tenant | None = scope["state"].get("tenant")
    return tenant
