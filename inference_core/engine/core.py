"""The request path below the routes: admit, limit, translate, send, retry.

Routes hand the engine a ``Call``; it returns a ``Reply`` (a whole body) or a ``Stream`` (SSE
frames). Failures are raised as ``GatewayError``s carrying the headers the client should see.
Nothing here knows about HTTP frameworks, and nothing here knows a backend's quirks: those
belong to the provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from inference_core import sse
from inference_core.endpoints import Endpoint
from inference_core.engine import retry
from inference_core.engine.admission import Admission
from inference_core.engine.affinity import ResponseAffinity
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.replicas import Balancer, Load, Replica
from inference_core.errors import (
    BadUpstreamResponse,
    GatewayError,
    ModelNotFound,
    NoHealthyBackend,
    ResponseNotFound,
    UpstreamStatusError,
)
from inference_core.providers.base import Payload, Provider
from inference_core.tracing import NO_TRACER, AttributeValue, Span, Tracer
from inference_core.upstream import UpstreamResponse

DROPPED_PARAMS_HEADER = "x-inference-dropped-params"
QUEUE_MS_HEADER = "x-inference-queue-ms"
RETRIES_HEADER = "x-inference-retries"
PROBE_TIMEOUT_SECONDS = 5.0

log = logging.getLogger("inference_core")
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
        """Chat and completions say prompt/completion tokens; the Responses API says input/output."""
        if isinstance(usage, dict):
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens", usage.get("input_tokens")))
            self.completion_tokens = _int_or_none(usage.get("completion_tokens", usage.get("output_tokens")))


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
    #: Fewer retries than configured, if the client asked for fewer (``x-inference-max-retries``).
    max_retries: int | None = None
    #: A stored response this call builds on or acts on: it must reach the replica holding it.
    response_id: str | None = None
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
class Sent:
    """An upstream answer whose headers arrived, and the replica that gave it."""

    response: UpstreamResponse
    replica: Replica


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
    """Sends calls through one provider to a balanced set of replicas, within the gateway's limits."""

    def __init__(
        self,
        provider: Provider,
        balancer: Balancer,
        *,
        api_key: str,
        default_model: str,
        timeout: float,
        admission: Admission,
        retry_policy: retry.RetryPolicy,
        rate_limiter: RateLimiter | None = None,
        on_retry: Callable[[retry.RetryEvent], None] | None = None,
        affinity: ResponseAffinity,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.provider = provider
        self.balancer = balancer
        self.default_model = default_model
        self.timeout = timeout
        self.admission = admission
        self.retry_policy = retry_policy
        self.rate_limiter = rate_limiter
        self.on_retry = on_retry
        self.tracer = tracer
        self.affinity = affinity
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.discovered = False

    def _headers(self, request_id: str) -> dict[str, str]:
        return {**self._auth, "Content-Type": "application/json", "X-Request-Id": request_id}

    async def discover(self, replica: Replica) -> None:
        """Ask the backend what it is (e.g. vLLM's version decides how to translate), until it says.

        Called by the health monitor at start-up and with every probe, never on the request path.
        """
        path = self.provider.discovery_path
        if path is None or self.discovered:
            return
        try:
            response = await replica.transport.request("GET", path, headers=self._auth, within=PROBE_TIMEOUT_SECONDS)
            body = await response.read()
            if response.status == 200:
                self.provider.learn(body)
                self.discovered = True
        except (GatewayError, ValueError):
            pass  # the next probe asks again; until then the provider assumes a current backend

    # One call, start to end.

    async def complete(self, call: Call) -> Reply:
        outcome = call.outcome
        pinned = self._holder(call)
        await self._admit(call)
        try:
            _, headers, body = await self._with_retries(call, pinned, stream=False)
        except GatewayError as error:
            error.headers.update(outcome.headers())
            raise
        finally:
            self.admission.release()
        assert body is not None
        if call.endpoint.method == "DELETE" and call.response_id is not None:
            self.affinity.forget(call.response_id)
        return Reply(body, headers | outcome.headers())

    async def stream(self, call: Call) -> Stream:
        """Start a stream; its slot is held until ``Stream.aclose``."""
        pinned = self._holder(call)
        await self._admit(call)
        try:
            sent, headers, _ = await self._with_retries(call, pinned, stream=True)
        except BaseException as error:
            self.admission.release()
            if isinstance(error, GatewayError):
                error.headers.update(call.outcome.headers())
            raise

        def release() -> None:
            sent.replica.in_flight -= 1
            self.admission.release()

        frames = sse.whole_frames(sent.response.chunks(), call.endpoint.stream_ends)
        if call.endpoint.stores_responses:
            frames = self._remembering(frames, sent.replica)
        return Stream(frames, headers | call.outcome.headers(), sent.response, release)

    def _holder(self, call: Call) -> Replica | None:
        """The replica holding the stored response ``call`` is about; None when it is about none."""
        if call.response_id is None:
            return None
        name = self.affinity.replica_of(call.response_id)
        holder = next((replica for replica in self.balancer.replicas if replica.name == name), None)
        if holder is None:
            raise ResponseNotFound(f"No response with id '{call.response_id}' is known.", param="response_id")
        return holder

    async def _remembering(self, frames: AsyncIterator[bytes], replica: Replica) -> AsyncIterator[bytes]:
        """Relay ``frames``, noting which replica holds the response the stream creates."""
        async for frame in frames:
            if b"response.created" in frame:
                created = sse.created_response_id(frame)
                if created is not None:
                    self.affinity.remember(created, replica.name)
            yield frame

    async def _admit(self, call: Call) -> None:
        with self.tracer.span("queue", {"inference_core.priority": call.priority}):
            call.outcome.queued = await self.admission.acquire(call.priority)

    def _prepare(self, call: Call) -> tuple[Payload, bytes | None, tuple[str, ...]]:
        """The payload as the backend wants it, serialised once for every attempt (None: no body)."""
        payload = call.payload
        raw = call.raw
        if not call.endpoint.body:
            return payload, None, ()
        if "model" not in payload:
            payload = {**payload, "model": self.default_model}
            raw = None
        translation = self.provider.translate(call.endpoint, payload)
        if translation.changed or raw is None:
            raw = orjson.dumps(translation.payload)
        return translation.payload, raw, translation.dropped

    async def _with_retries(
        self, call: Call, pinned: Replica | None, *, stream: bool
    ) -> tuple[Sent, dict[str, str], bytes | None]:
        """Send until an attempt succeeds, the error is not worth retrying, or time runs out.

        Each attempt goes to a replica this call has not tried yet, where there is one, unless
        the call is ``pinned`` to the replica holding its stored response.
        """
        outcome = call.outcome
        deadline = time.monotonic() + self.timeout
        policy = self.retry_policy
        max_retries = policy.max_retries if call.max_retries is None else min(call.max_retries, policy.max_retries)
        payload, raw, dropped = self._prepare(call)
        name, attributes = self._span_details(call) if self.tracer.enabled else ("", {})
        tried: list[Replica] = []
        while True:
            if self.rate_limiter is not None:
                # Waiting for the rate limit is waiting in line: it counts as queue time.
                waited = await self.rate_limiter.acquire(within=deadline - time.monotonic())
                outcome.queued += waited
                outcome.rate_limited += waited
            replica = pinned or self.balancer.pick(payload, tried)
            tried.append(replica)
            started = time.perf_counter()
            replica.in_flight += 1
            replica.requests += 1
            try:
                with self.tracer.span(name, attributes, kind="client") as span:
                    span.set("server.address", replica.address)
                    result = await self._attempt(call, replica, raw, deadline - time.monotonic(), span, stream=stream)
            except GatewayError as error:
                replica.in_flight -= 1
                outcome.upstream += time.perf_counter() - started
                why = retry.reason(error)
                outcome.upstream_errors.append(why or _failure_kind(error))
                self._blame(replica, error)
                asked = error.retry_after if isinstance(error, UpstreamStatusError) else None
                if why == "429" and self.rate_limiter is not None:
                    self.rate_limiter.throttled(asked)
                if why is None or outcome.retries >= max_retries or not self.balancer.healthy():
                    raise
                delay = policy.delay(outcome.retries, asked)
                if time.monotonic() + delay >= deadline:
                    raise
                if self.on_retry is not None:
                    self.on_retry(retry.RetryEvent(call.request_id, outcome.retries + 1, why, delay))
                await asyncio.sleep(delay)
                outcome.backoff += delay
                outcome.retries += 1
            except BaseException:
                replica.in_flight -= 1
                raise
            else:
                if not stream:
                    replica.in_flight -= 1
                replica.succeeded()
                outcome.upstream += time.perf_counter() - started
                if self.rate_limiter is not None:
                    self.rate_limiter.succeeded()
                sent, headers, body = result
                if dropped:
                    headers[DROPPED_PARAMS_HEADER] = ",".join(dropped)
                return sent, headers, body

    def _blame(self, replica: Replica, error: GatewayError) -> None:
        """Failures that say the replica is unwell (not the request) count toward its ejection.

        A request's failures never take the last replica in rotation out: one request's 500 says
        too little for that. Only failing health probes do (see ``HealthMonitor``).
        """
        replica.errors += 1
        unwell = not isinstance(error, UpstreamStatusError) or error.status >= 500
        others = len(self.balancer.healthy()) > 1
        if unwell and others and replica.failed(eject_after=self.balancer.eject_after):
            log.warning("replica ejected", extra={"fields": {"replica": replica.name, "address": replica.address}})

    async def _attempt(
        self, call: Call, replica: Replica, raw: bytes | None, within: float, span: Span, *, stream: bool
    ) -> tuple[Sent, dict[str, str], bytes | None]:
        """One upstream attempt: send, and (unless streaming) read and check the body."""
        request_headers = self._headers(call.request_id)
        self.tracer.inject(request_headers)
        response = await replica.transport.request(
            call.endpoint.method,
            call.endpoint.upstream,
            headers=request_headers,
            body=raw,
            within=within,
            stream=stream,
        )
        span.set("http.response.status_code", response.status)
        if response.status >= 400:
            raise self._upstream_error(response, await response.read())
        headers = _relayed_headers(response.headers)
        if stream:
            return Sent(response, replica), headers, None
        body = await response.read()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadUpstreamResponse("The backend answered with malformed JSON.") from None
        if isinstance(parsed, dict):
            if call.endpoint.stores_responses and isinstance(parsed.get("id"), str):
                self.affinity.remember(parsed["id"], replica.name)
            outcome = call.outcome
            outcome.model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
            outcome.count_usage(parsed.get("usage"))
            span.set("gen_ai.response.model", outcome.model)
            span.set("gen_ai.usage.input_tokens", outcome.prompt_tokens)
            span.set("gen_ai.usage.output_tokens", outcome.completion_tokens)
        return Sent(response, replica), headers, body

    def _span_details(self, call: Call) -> tuple[str, dict[str, AttributeValue]]:
        """An upstream attempt's span name and OpenTelemetry GenAI attributes."""
        payload = call.payload
        operation = call.endpoint.operation
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

    async def _get(self, replica: Replica, path: str, request_id: str) -> bytes:
        headers = {**self._auth, "X-Request-Id": request_id}
        response = await replica.transport.request("GET", path, headers=headers, within=PROBE_TIMEOUT_SECONDS)
        body = await response.read()
        if response.status >= 400:
            raise self._upstream_error(response, body)
        return body

    async def models(self, request_id: str) -> bytes:
        """The backend's model list; with several replicas, the union of theirs."""
        replicas = self.balancer.healthy()
        if not replicas:
            raise NoHealthyBackend("No healthy backend replica can list models right now.")
        if len(self.balancer.replicas) == 1:
            return await self._get(replicas[0], "models", request_id)  # relayed as the backend wrote it
        answers = await asyncio.gather(*(self._get(r, "models", request_id) for r in replicas), return_exceptions=True)
        merged: dict[str, object] = {}
        for answer in answers:
            for entry in _model_entries(answer):
                merged.setdefault(entry["id"], entry)
        if not merged and isinstance(answers[0], GatewayError):
            raise answers[0]
        return orjson.dumps({"object": "list", "data": list(merged.values())})

    async def model(self, model_id: str, request_id: str) -> bytes:
        """One model from the backend's list: vLLM has no retrieve endpoint, and ids hold slashes."""
        for entry in _model_entries(await self.models(request_id)):
            if entry["id"] == model_id:
                return orjson.dumps(entry)
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    async def probe(self, replica: Replica) -> Probe:
        """Is this replica answering? Also learns the models it serves."""
        started = time.perf_counter()
        try:
            await self._get(replica, self.provider.health_path, "health-probe")
            ok = True
        except GatewayError:
            ok = False
        latency = (time.perf_counter() - started) * 1000
        if ok:
            try:
                listed = _model_entries(await self._get(replica, "models", "health-probe"))
                replica.models = frozenset(entry["id"] for entry in listed)
            except GatewayError:
                pass
        return Probe(ok, latency)

    async def scrape_load(self, replica: Replica) -> None:
        """Read a vLLM replica's own queue figures from its ``/metrics``."""
        try:
            text = (await self._get(replica, "../metrics", "load-scrape")).decode(errors="replace")
        except GatewayError:
            return
        figures = dict.fromkeys(_LOAD_GAUGES.values(), 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in _LOAD_GAUGES:
                try:
                    figures[_LOAD_GAUGES[name]] += float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    continue
        replica.load = Load(figures["waiting"], figures["running"], figures["kv_cache"], time.monotonic())


_LOAD_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_cache",
}


def _model_entries(answer: object) -> list[dict[str, Any]]:
    """The entries of a ``/models`` body that have an id; nothing for an error or a malformed body."""
    if not isinstance(answer, bytes):
        return []
    try:
        data = orjson.loads(answer).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return (
        [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        if isinstance(data, list)
        else []
    )
