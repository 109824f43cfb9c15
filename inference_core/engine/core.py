"""The request path below the routes: translate, send, and turn the backend's answer into ours.

Routes hand the engine a ``Call``; it returns a ``Reply`` (a whole body) or a ``Stream`` (SSE
frames). Failures are raised as ``GatewayError``s. Nothing here knows about HTTP frameworks,
and nothing here knows a backend's quirks: those belong to the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import orjson

from inference_core import sse
from inference_core.errors import BadUpstreamResponse, GatewayError, ModelNotFound
from inference_core.providers.base import Endpoint, Payload, Provider
from inference_core.upstream import Transport, UpstreamResponse

DROPPED_PARAMS_HEADER = "x-inference-dropped-params"
#: How long to wait before asking the backend who it is again, after it failed to say.
DISCOVERY_RETRY_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Call:
    """One OpenAI operation to perform; ``raw`` is the client's body, forwarded when unchanged."""

    endpoint: Endpoint
    payload: Payload
    request_id: str
    raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer: the backend's body bytes, relayed untouched."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(frozen=True, slots=True)
class Stream:
    """An answer still arriving: whole SSE frames, and a way to stop the backend early."""

    frames: AsyncIterator[bytes]
    headers: dict[str, str]
    upstream: UpstreamResponse

    async def aclose(self) -> None:
        await self.upstream.aclose()


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    latency_ms: float


def _relayed_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The backend's headers a client may see: rate-limit hints, never server identities."""
    return {name: value for name, value in upstream.items() if name.lower().startswith("x-ratelimit-")}


class Engine:
    """Sends calls through one provider and transport."""

    def __init__(self, provider: Provider, transport: Transport, *, api_key: str, default_model: str) -> None:
        self.provider = provider
        self.transport = transport
        self.default_model = default_model
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._discovery_lock = asyncio.Lock()
        self._discovered_at: float | None = None
        self._discovery_failed_at = -DISCOVERY_RETRY_SECONDS

    def _headers(self, request_id: str) -> dict[str, str]:
        return {**self._auth, "Content-Type": "application/json", "X-Request-Id": request_id}

    async def discover(self) -> None:
        """Ask the backend what it is, once (e.g. vLLM's version decides how to translate)."""
        path = self.provider.discovery_path
        if path is None or self._discovered_at is not None:
            return
        if time.monotonic() - self._discovery_failed_at < DISCOVERY_RETRY_SECONDS:
            return
        async with self._discovery_lock:
            if self._discovered_at is not None:
                return
            try:
                response = await self.transport.request("GET", path, headers=self._auth, within=PROBE_TIMEOUT_SECONDS)
                body = await response.read()
                if response.status != 200:
                    raise BadUpstreamResponse(f"discovery answered HTTP {response.status}")
                self.provider.learn(body)
            except (GatewayError, ValueError):
                self._discovery_failed_at = time.monotonic()
            else:
                self._discovered_at = time.monotonic()

    async def _send(self, call: Call, *, stream: bool) -> tuple[UpstreamResponse, dict[str, str]]:
        """Translate and send ``call``; raise the backend's error if it answered with one."""
        await self.discover()
        payload = call.payload
        raw = call.raw
        if "model" not in payload:
            payload = {**payload, "model": self.default_model}
            raw = None
        translation = self.provider.translate(call.endpoint, payload)
        if translation.changed or raw is None:
            raw = orjson.dumps(translation.payload)
        response = await self.transport.request(
            "POST", call.endpoint.value, headers=self._headers(call.request_id), body=raw, stream=stream
        )
        if response.status >= 400:
            body = await response.read()
            raise self.provider.classify_error(response.status, body)
        headers = _relayed_headers(response.headers)
        if translation.dropped:
            headers[DROPPED_PARAMS_HEADER] = ",".join(translation.dropped)
        return response, headers

    async def complete(self, call: Call) -> Reply:
        response, headers = await self._send(call, stream=False)
        body = await response.read()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadUpstreamResponse("The backend answered with malformed JSON.") from None
        return Reply(body, headers)

    async def stream(self, call: Call) -> Stream:
        response, headers = await self._send(call, stream=True)
        return Stream(sse.whole_frames(response.chunks()), headers, response)

    async def models(self, request_id: str) -> bytes:
        response = await self.transport.request("GET", "models", headers={**self._auth, "X-Request-Id": request_id})
        body = await response.read()
        if response.status >= 400:
            raise self.provider.classify_error(response.status, body)
        return body

    async def model(self, model_id: str, request_id: str) -> bytes:
        """One model from the backend's list: vLLM has no retrieve endpoint, and ids hold slashes."""
        try:
            listed = orjson.loads(await self.models(request_id))["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise BadUpstreamResponse("The backend's model list is malformed.") from None
        for entry in listed:
            if isinstance(entry, dict) and entry.get("id") == model_id:
                return orjson.dumps(entry)
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    async def probe(self) -> Probe:
        """Is the backend answering? Used by the readiness check."""
        started = time.perf_counter()
        try:
            response = await self.transport.request(
                "GET", self.provider.health_path, headers=self._auth, within=PROBE_TIMEOUT_SECONDS
            )
            await response.read()
            ok = response.status < 400
        except GatewayError:
            ok = False
        return Probe(ok, (time.perf_counter() - started) * 1000)
