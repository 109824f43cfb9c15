"""The request path below the routes: admit, limit, translate, send, retry.

Routes hand the engine a ``Call``; it returns a ``Reply`` (a whole body) or a ``Stream`` (SSE
frames). Failures are raised as ``GatewayError``s carrying the headers the client should see.
Nothing here knows about HTTP frameworks, and nothing here knows a backend's quirks: those
belong to the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import orjson

from inference_core import sse
from inference_core.engine import retry
from inference_core.engine.admission import Admission
from inference_core.engine.ratelimit import RateLimiter
from inference_core.errors import BadUpstreamResponse, GatewayError, ModelNotFound, UpstreamStatusError
from inference_core.providers.base import Endpoint, Payload, Provider
from inference_core.tracing import NO_TRACER, AttributeValue, Span, Tracer
from inference_core.upstream import Transport, UpstreamResponse

DROPPED_PARAMS_HEADER = "x-inference-dropped-params"
QUEUE_MS_HEADER = "x-inference-queue-ms"
RETRIES_HEADER = "x-inference-retries"
PROBE_TIMEOUT_SECONDS = 5.0

_OPERATIONS = {Endpoint.CHAT: "chat", Endpoint.COMPLETIONS: "text_completion", Endpoint.EMBEDDINGS: "embeddings"}
_REQUEST_ATTRIBUTES = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)


@dataclass(slots=True)
class Outcome:
    """What happened to one call, filled in by the engine, read by headers, logs, metrics and spans."""

    queued: float = 0.0
    #: Of ``queued``, the seconds spent waiting for the rate limit.
    rate_limited: float = 0.0
    retries: int = 0
    #: Seconds slept between attempts.
    backoff: float = 0.0
    #: Seconds spent waiting on the backend, over all attempts (to headers, or whole body).
    upstream: float = 0.0
    #: One entry per failed attempt: connect, timeout, bad_response or the HTTP status.
    upstream_errors: list[str] = field(default_factory=list)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def headers(self) -> dict[str, str]:
        return {QUEUE_MS_HEADER: f"{self.queued * 1000:.1f}", RETRIES_HEADER: str(self.retries)}

    def count_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
            self.completion_tokens = _int_or_none(usage.get("completion_tokens"))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Call:
    """One OpenAI operation to perform; ``raw`` is the client's body, forwarded when unchanged."""

    endpoint: Endpoint
    payload: Payload
    request_id: str
    raw: bytes | None = None
    priority: int = 0
    outcome: Outcome = field(default_factory=Outcome)


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer: the backend's body bytes, relayed untouched."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(slots=True)
class Stream:
    """An answer still arriving: whole SSE frames; ``aclose`` stops the backend and frees the slot."""

    frames: AsyncIterator[bytes]
    headers: dict[str, str]
    upstream: UpstreamResponse
    release: Callable[[], None]
    closed: bool = False

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.release()
            await self.upstream.aclose()


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    latency_ms: float


def _failure_kind(error: GatewayError) -> str:
    """A bounded label for an upstream failure that is not retried."""
    if isinstance(error, UpstreamStatusError):
        return str(error.status)
    return "bad_response" if isinstance(error, BadUpstreamResponse) else "other"


def _relayed_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The backend's headers a client may see: rate-limit hints, never server identities."""
    return {name: value for name, value in upstream.items() if name.lower().startswith("x-ratelimit-")}


class Engine:
    """Sends calls through one provider and transport, within the gateway's limits."""

    def __init__(
        self,
        provider: Provider,
        transport: Transport,
        *,
        api_key: str,
        default_model: str,
        timeout: float,
        admission: Admission,
        retry_policy: retry.RetryPolicy,
        rate_limiter: RateLimiter | None = None,
        on_retry: Callable[[retry.RetryEvent], None] | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.provider = provider
        self.transport = transport
        self.default_model = default_model
        self.timeout = timeout
        self.admission = admission
        self.retry_policy = retry_policy
        self.rate_limiter = rate_limiter
        self.on_retry = on_retry
        self.tracer = tracer
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.discovered = False

    def _headers(self, request_id: str) -> dict[str, str]:
        return {**self._auth, "Content-Type": "application/json", "X-Request-Id": request_id}

    async def discover(self) -> None:
        """Ask the backend what it is (e.g. vLLM's version decides how to translate), until it says.

        Called by the health monitor at start-up and with every probe, never on the request path.
        """
        path = self.provider.discovery_path
        if path is None or self.discovered:
            return
        try:
            response = await self.transport.request("GET", path, headers=self._auth, within=PROBE_TIMEOUT_SECONDS)
            body = await response.read()
            if response.status == 200:
                self.provider.learn(body)
                self.discovered = True
        except (GatewayError, ValueError):
            pass  # the next probe asks again; until then the provider assumes a current backend

    # One call, start to end.

    async def complete(self, call: Call) -> Reply:
        outcome = call.outcome
        await self._admit(call)
        try:
            _, headers, body = await self._with_retries(call, stream=False)
        except GatewayError as error:
            error.headers.update(outcome.headers())
            raise
        finally:
            self.admission.release()
        assert body is not None
        return Reply(body, headers | outcome.headers())

    async def stream(self, call: Call) -> Stream:
        """Start a stream; its slot is held until ``Stream.aclose``."""
        await self._admit(call)
        try:
            response, headers, _ = await self._with_retries(call, stream=True)
        except BaseException as error:
            self.admission.release()
            if isinstance(error, GatewayError):
                error.headers.update(call.outcome.headers())
            raise
        frames = sse.whole_frames(response.chunks())
        return Stream(frames, headers | call.outcome.headers(), response, self.admission.release)

    async def _admit(self, call: Call) -> None:
        with self.tracer.span("queue", {"inference_core.priority": call.priority}):
            call.outcome.queued = await self.admission.acquire(call.priority)

    async def _with_retries(self, call: Call, *, stream: bool) -> tuple[UpstreamResponse, dict[str, str], bytes | None]:
        """Send until an attempt succeeds, the error is not worth retrying, or time runs out."""
        outcome = call.outcome
        deadline = time.monotonic() + self.timeout
        policy = self.retry_policy
        name, attributes = self._span_details(call) if self.tracer.enabled else ("", {})
        while True:
            if self.rate_limiter is not None:
                # Waiting for the rate limit is waiting in line: it counts as queue time.
                waited = await self.rate_limiter.acquire(within=deadline - time.monotonic())
                outcome.queued += waited
                outcome.rate_limited += waited
            started = time.perf_counter()
            try:
                with self.tracer.span(name, attributes, kind="client") as span:
                    result = await self._attempt(call, deadline - time.monotonic(), span, stream=stream)
            except GatewayError as error:
                outcome.upstream += time.perf_counter() - started
                why = retry.reason(error)
                outcome.upstream_errors.append(why or _failure_kind(error))
                asked = error.retry_after if isinstance(error, UpstreamStatusError) else None
                if why == "429" and self.rate_limiter is not None:
                    self.rate_limiter.throttled(asked)
                if why is None or outcome.retries >= policy.max_retries:
                    raise
                delay = policy.delay(outcome.retries, asked)
                if time.monotonic() + delay >= deadline:
                    raise
                if self.on_retry is not None:
                    self.on_retry(retry.RetryEvent(call.request_id, outcome.retries + 1, why, delay))
                await asyncio.sleep(delay)
                outcome.backoff += delay
                outcome.retries += 1
            else:
                outcome.upstream += time.perf_counter() - started
                if self.rate_limiter is not None:
                    self.rate_limiter.succeeded()
                return result

    async def _attempt(
        self, call: Call, within: float, span: Span, *, stream: bool
    ) -> tuple[UpstreamResponse, dict[str, str], bytes | None]:
        """One upstream attempt: translate, send, and (unless streaming) read and check the body."""
        payload = call.payload
        raw = call.raw
        if "model" not in payload:
            payload = {**payload, "model": self.default_model}
            raw = None
        translation = self.provider.translate(call.endpoint, payload)
        if translation.changed or raw is None:
            raw = orjson.dumps(translation.payload)
        request_headers = self._headers(call.request_id)
        self.tracer.inject(request_headers)
        response = await self.transport.request(
            "POST",
            call.endpoint.value,
            headers=request_headers,
            body=raw,
            within=within,
            stream=stream,
        )
        span.set("http.response.status_code", response.status)
        if response.status >= 400:
            raise self._upstream_error(response, await response.read())
        headers = _relayed_headers(response.headers)
        if translation.dropped:
            headers[DROPPED_PARAMS_HEADER] = ",".join(translation.dropped)
        if stream:
            return response, headers, None
        body = await response.read()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadUpstreamResponse("The backend answered with malformed JSON.") from None
        if isinstance(parsed, dict):
            outcome = call.outcome
            outcome.model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
            outcome.count_usage(parsed.get("usage"))
            span.set("gen_ai.response.model", outcome.model)
            span.set("gen_ai.usage.input_tokens", outcome.prompt_tokens)
            span.set("gen_ai.usage.output_tokens", outcome.completion_tokens)
        return response, headers, body

    def _span_details(self, call: Call) -> tuple[str, dict[str, AttributeValue]]:
        """An upstream attempt's span name and OpenTelemetry GenAI attributes."""
        payload = call.payload
        operation = _OPERATIONS[call.endpoint]
        model = payload.get("model") or self.default_model
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": self.provider.name,
            "gen_ai.request.model": str(model),
        }
        for field_name, attribute in _REQUEST_ATTRIBUTES:
            value = payload.get(field_name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[attribute] = value
        return f"{operation} {model}", attributes

    def _upstream_error(self, response: UpstreamResponse, body: bytes) -> UpstreamStatusError:
        error = self.provider.classify_error(response.status, body)
        error.retry_after = retry.retry_after(response.headers)
        if "retry-after" in response.headers:
            error.headers["retry-after"] = response.headers["retry-after"]
        return error

    # Side doors: models and health, outside the queue.

    async def models(self, request_id: str) -> bytes:
        response = await self.transport.request("GET", "models", headers={**self._auth, "X-Request-Id": request_id})
        body = await response.read()
        if response.status >= 400:
            raise self._upstream_error(response, body)
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
        """Is the backend answering? Used by the health checks."""
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
